"""Parts (c)-(e) of benchmarks/gpu_bench.py: the engine on the GPU, on random-weight models made
on the device (the GPU machine has no hub). Written against the engine API the GPU backend is to
add (EngineArgs.device / dtype); gpu_bench.py calls this only when EngineArgs has `device`.

Models: a Llama-2-7B-shaped fp16 model (32 layers, 4096 hidden, 11008 intermediate, 32 heads,
vocab 32000) and the default model's shape (SmolLM2-135M) unless a real model dir is given.
W4 g128: round-to-nearest with lowbit's own quantizer, written as an AutoAWQ GEMM checkpoint
(lowbit.quant.formats.awq_gemm). A word-level tokenizer over "t0".."t{V-1}" stands in for the
real one: prompts are token ids, so only detokenization sees it.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

WORK = Path("/tmp/lowbit_gpu_bench")
LLAMA7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5)
DEFAULT_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=8192,
                     rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _save_tokenizer(out: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", bos_token="t1", eos_token="t2").save_pretrained(out)


def make_fp_model(out: Path, shape: dict, dtype: torch.dtype, std: float = 0.02, device: str = "cuda"):
    """A random Llama of `shape` built on `device`, saved as safetensors; returns the HF model."""
    import transformers as tf

    cfg = tf.LlamaConfig(initializer_range=std, bos_token_id=1, eos_token_id=2, **shape)
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = tf.LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(prev)
    if not (out / "config.json").exists():
        model.save_pretrained(out, safe_serialization=True)
        _save_tokenizer(out, shape["vocab_size"])
    return model


def make_w4_checkpoint(fp_model, src: Path, out: Path) -> None:
    """RTN W4 g128 of every decoder linear, as an AutoAWQ GEMM checkpoint (fp16 elsewhere)."""
    from safetensors.torch import save_file

    from lowbit.quant.formats import awq_gemm
    from lowbit.quant.primitives import quantize_weight

    if (out / "config.json").exists():
        return
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, p in fp_model.state_dict().items():
        mod = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and mod.rsplit(".", 1)[-1] in LINEARS:
            qw = quantize_weight(p, 4, 128, scale_dtype=torch.float16)
            tensors.update({f"{mod}.{k}": v.cpu() for k, v in awq_gemm.pack(qw).items()})
        else:
            tensors[name] = p.half().cpu()
    if fp_model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    save_file(tensors, str(out / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = awq_gemm.quantization_config(4, 128, True, ["lm_head"])
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "generation_config")):
            (out / f.name).write_bytes(f.read_bytes())


def engine_tok_s(model_dir: Path, prompts: list[list[int]], out_len: int, **engine_args) -> tuple[float, list]:
    from lowbit.engine.llm import LLM
    from lowbit.engine.sampling_params import SamplingParams

    llm = LLM(str(model_dir), device="cuda", **engine_args)
    sp = SamplingParams(max_tokens=out_len, ignore_eos=True, temperature=0.0)
    llm.generate(prompts[:1], SamplingParams(max_tokens=8, ignore_eos=True, temperature=0.0))  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sp)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    del llm
    torch.cuda.empty_cache()
    return len(prompts) * out_len / dt, outs


def hf_tok_s(model, prompt: list[int], out_len: int) -> float:
    ids = torch.tensor([prompt], device="cuda")
    model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=out_len, min_new_tokens=out_len, do_sample=False)
    torch.cuda.synchronize()
    return out_len / (time.perf_counter() - t0)


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, length), generator=g).tolist()


def run_engine_parts(parts: list[str], default_model: Path | None = None) -> None:
    fp_dir, w4_dir = WORK / "llama7b-fp16", WORK / "llama7b-w4g128"
    if "c" in parts or "d" in parts:
        model = make_fp_model(fp_dir, LLAMA7B, torch.float16)
        make_w4_checkpoint(model, fp_dir, w4_dir)
        if "c" in parts:
            p = _prompts(1, 32, LLAMA7B["vocab_size"], 0)
            hf = hf_tok_s(model, p[0], 128)
        del model
        torch.cuda.empty_cache()
        if "c" in parts:
            w4, _ = engine_tok_s(w4_dir, p, 128, dtype="float16")
            fp, _ = engine_tok_s(fp_dir, p, 128, dtype="float16")
            print(f"(c) batch-1 decode, 7B shape: W4 g128 {w4:.1f} tok/s, ours fp16 {fp:.1f} tok/s, "
                  f"transformers fp16 {hf:.1f} tok/s -> {w4 / hf:.2f}x HF, {w4 / fp:.2f}x our fp16", flush=True)
        if "d" in parts:
            p = _prompts(64, 128, LLAMA7B["vocab_size"], 1)
            w4, _ = engine_tok_s(w4_dir, p, 128, dtype="float16", max_num_seqs=64)
            fp, _ = engine_tok_s(fp_dir, p, 128, dtype="float16", max_num_seqs=64)
            print(f"(d) 64 x (128 in, 128 out): W4A16 {w4:.0f} tok/s, fp16 {fp:.0f} tok/s -> {w4 / fp:.2f}x", flush=True)
    if "e" in parts:
        part_e(default_model)


def part_e(default_model: Path | None) -> None:
    from lowbit.engine.llm import LLM
    from lowbit.engine.sampling_params import SamplingParams

    src = default_model
    if src is None:
        src = WORK / "default-shape-fp32"
        make_fp_model(src, DEFAULT_SHAPE, torch.float32, std=0.1)  # wider init: peakier logits
        torch.cuda.empty_cache()
    prompts = _prompts(32, 16, DEFAULT_SHAPE["vocab_size"], 2)
    sp = SamplingParams(max_tokens=32, temperature=0.0, logprobs=2)
    cpu = LLM(str(src), device="cpu").generate(prompts, sp)
    gpu = LLM(str(src), device="cuda").generate(prompts, sp)
    same = 0
    for i, (a, b) in enumerate(zip(cpu, gpu)):
        ta, tb = a.outputs[0].token_ids, b.outputs[0].token_ids
        if ta == tb:
            same += 1
            continue
        j = next(k for k, (x, y) in enumerate(zip(ta, tb)) if x != y)
        lps = sorted((lp.logprob for lp in a.outputs[0].logprobs[j].values()), reverse=True)
        print(f"(e) prompt {i}: diverges at token {j}; CPU top-2 logprob margin {lps[0] - lps[1]:.2e}")
    print(f"(e) greedy tokens GPU == CPU fp32 for {same}/32 prompts ({'real' if default_model else 'random'} weights)")
