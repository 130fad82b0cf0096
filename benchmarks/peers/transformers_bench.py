#!/usr/bin/env python3
"""Hugging Face transformers (eager PyTorch, fp32) peer benchmark. ONE JSON object on stdout.

Runs in the project's own venv (it has torch 2.13.0+cpu and transformers):
  .venv/bin/python benchmarks/peers/transformers_bench.py --hf-dir PATH --mode decode
  .venv/bin/python benchmarks/peers/transformers_bench.py --hf-dir PATH --mode throughput \
      --num-prompts 64 --input-len 128 --output-len 128 [--batch-size N]

decode:     batch 1, prompts.decode_prompt() (32 tokens), generate(max_new_tokens=128,
            min_new_tokens=128, greedy), torch threads = --threads (2); one warm-up then --runs (3).
            Per-token times come from a streamer (put() is called as each new token is produced):
            TTFT = time to the first new token, decode tokens/s = (n-1) / (t_n - t_1).
throughput: the N prompts of prompts.make_prompts in batches of --batch-size (default: all N in one
            batch; the 64 x (128+128) workload fits easily for a 135M model), left padding,
            min_new_tokens = max_new_tokens (= ignore EOS), greedy, DynamicCache; median wall time.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _common as C  # noqa: E402
import prompts as P  # noqa: E402


class _TimingStreamer:
    """Minimal generate() streamer: records the time of each put() after the prompt."""

    def __init__(self):
        self.times = []
        self._prompt_seen = False

    def put(self, value):
        if not self._prompt_seen:  # the first put() is the prompt
            self._prompt_seen = True
            return
        self.times.append(C.now())

    def end(self):
        pass


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf-dir", required=True)
    ap.add_argument("--mode", choices=["decode", "throughput"], required=True)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=None,
                    help=f"default {P.DECODE_INPUT_LEN} (decode) / 128 (throughput)")
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=0, help="throughput: default = num-prompts")
    ap.add_argument("--attn", default="sdpa", help="attn_implementation (sdpa|eager)")
    ap.add_argument("--vocab-size", type=int, default=0,
                    help="prompt ids are drawn below this (default: prompts.prompt_vocab_size of --hf-dir)")
    args = ap.parse_args(argv)
    if args.input_len is None:
        args.input_len = P.DECODE_INPUT_LEN if args.mode == "decode" else 128

    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    t0 = C.now()
    model = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32,
                                                 attn_implementation=args.attn)
    model.eval()
    load_s = C.now() - t0
    vocab = args.vocab_size or P.prompt_vocab_size(args.hf_dir)
    pad_id = model.config.pad_token_id
    if pad_id is None:
        eos = model.config.eos_token_id
        pad_id = eos[0] if isinstance(eos, (list, tuple)) else (eos if eos is not None else 0)
    res = C.base_result("transformers", args.mode, args)
    res["engine"] = {"name": "transformers", "version": transformers.__version__, "torch": torch.__version__,
                     "dtype": "float32", "attn_implementation": args.attn, "torch_threads": torch.get_num_threads(),
                     "load_s": round(load_s, 2), "cache": "DynamicCache (default)"}
    res["model"] = {"hf_dir": os.path.abspath(args.hf_dir)}

    def generate(ids: torch.Tensor, mask: torch.Tensor, n: int, streamer=None):
        with torch.inference_mode():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, num_beams=1, pad_token_id=pad_id, streamer=streamer)

    if args.mode == "decode":
        prompt = P.decode_prompt(vocab, input_len=args.input_len)
        res["workload"] = {"batch": 1, "input_len": len(prompt), "output_len": args.output_len,
                           "vocab_size": vocab, "prompt_fingerprint": P.fingerprint(prompt)}
        ids = torch.tensor([prompt], dtype=torch.long)
        mask = torch.ones_like(ids)
        C.log("warm-up")
        generate(ids, mask, args.output_len)
        ttfts, tps, e2e = [], [], []
        for r in range(args.runs):
            s = _TimingStreamer()
            t = C.now()
            out = generate(ids, mask, args.output_len, streamer=s)
            assert out.shape[1] - ids.shape[1] == args.output_len == len(s.times)
            ttfts.append(s.times[0] - t)
            tps.append((len(s.times) - 1) / (s.times[-1] - s.times[0]))
            e2e.append(s.times[-1] - t)
            C.log(f"run {r}: ttft {ttfts[-1]*1e3:.1f} ms, decode {tps[-1]:.1f} tok/s")
        res.update(C.decode_summary(ttfts, tps, e2e, args.output_len))
    else:
        prompts = P.make_prompts(args.num_prompts, args.input_len, vocab)
        bs = args.batch_size or len(prompts)
        res["workload"] = {"num_prompts": len(prompts), "input_len": args.input_len,
                           "output_len": args.output_len, "vocab_size": vocab,
                           "prompts_fingerprint": P.fingerprint(prompts), "batch_size": bs}

        def batches(prompts=prompts):
            # Left padding (all prompts here have the same length, so it is a no-op, kept for generality).
            for i in range(0, len(prompts), bs):
                chunk = prompts[i:i + bs]
                L = max(map(len, chunk))
                ids = torch.tensor([[pad_id] * (L - len(p)) + p for p in chunk], dtype=torch.long)
                mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in chunk], dtype=torch.long)
                yield ids, mask

        C.log("warm-up")
        ids0, mask0 = next(batches())
        generate(ids0[:4], mask0[:4], 8)
        walls = []
        for r in range(args.runs):
            t = C.now()
            for ids, mask in batches(P.run_prompts(args.num_prompts, args.input_len, vocab, r)):
                out = generate(ids, mask, args.output_len)
                assert out.shape[1] - ids.shape[1] == args.output_len
            walls.append(C.now() - t)
            C.log(f"run {r}: {walls[-1]:.2f} s")
        res.update(C.throughput_summary(walls, len(prompts), args.input_len, args.output_len))
    C.emit(res)


if __name__ == "__main__":
    main()
