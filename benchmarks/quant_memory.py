"""Peak memory of AWQ (or GPTQ, AWQ-GPTQ) quantization vs the checkpoint's size: can lowbit quantize a model that is
much larger than the memory it uses?

Builds a random-weight Llama-architecture checkpoint whose fp32 size is at least --min-gib
(written one layer-shard at a time, never held in RAM as a whole), then runs AWQ on it in a child
process under `/usr/bin/time -v` (--method: awq, gptq or awq-gptq) and prints the child's peak RSS against the checkpoint size.
The goal is peak RSS < 1/3 of the checkpoint.

Calibration uses random token ids (the random model has no tokenizer, and memory does not depend
on what the tokens say); the search settings are reduced so the run stays short on 2 cores.

Run:  python benchmarks/quant_memory.py [--method awq|gptq|awq-gptq] [--min-gib 2.0] [--workdir /tmp/lowbit-quant-memory] [--keep]
Needs /usr/bin/time (apt-get install time).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
GIB = 1024**3

# A wide-ish Llama: GQA 16/4 heads, SwiGLU, untied LM head; the layer count is chosen for the size.
SHAPE = dict(hidden=1024, intermediate=2816, heads=16, kv_heads=4, vocab=8192)


def layer_tensors(i: int, hidden: int, intermediate: int, heads: int, kv_heads: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    hd = hidden // heads
    p = f"model.layers.{i}."
    shapes = {
        "self_attn.q_proj.weight": (heads * hd, hidden),
        "self_attn.k_proj.weight": (kv_heads * hd, hidden),
        "self_attn.v_proj.weight": (kv_heads * hd, hidden),
        "self_attn.o_proj.weight": (hidden, heads * hd),
        "mlp.gate_proj.weight": (intermediate, hidden),
        "mlp.up_proj.weight": (intermediate, hidden),
        "mlp.down_proj.weight": (hidden, intermediate),
    }
    out = {p + k: torch.randn(s, generator=g) * (1.0 / math.sqrt(s[1])) for k, s in shapes.items()}
    out[p + "input_layernorm.weight"] = 1.0 + 0.1 * torch.randn(hidden, generator=g)
    out[p + "post_attention_layernorm.weight"] = 1.0 + 0.1 * torch.randn(hidden, generator=g)
    return out


def make_checkpoint(out: Path, min_bytes: int) -> tuple[int, int]:
    """Write config.json + one safetensors shard per layer (+ one for embeddings/head)."""
    s = SHAPE
    per_layer = 4 * (s["hidden"] * s["hidden"] * 2 + 2 * s["hidden"] * s["hidden"] * s["kv_heads"] // s["heads"]
                     + 3 * s["hidden"] * s["intermediate"] + 2 * s["hidden"])
    outer = 4 * (2 * s["vocab"] * s["hidden"] + s["hidden"])
    layers = max(1, math.ceil((min_bytes - outer) / per_layer))
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    names = [f"model-{i:05d}-of-{layers + 1:05d}.safetensors" for i in range(1, layers + 2)]
    outer_t = {
        "model.embed_tokens.weight": torch.randn(s["vocab"], s["hidden"], generator=g),
        "model.norm.weight": torch.ones(s["hidden"]),
        "lm_head.weight": torch.randn(s["vocab"], s["hidden"], generator=g) / math.sqrt(s["hidden"]),
    }
    shards = [outer_t] + [None] * layers
    for idx, fname in enumerate(names):
        t = shards[idx] if idx == 0 else layer_tensors(idx - 1, s["hidden"], s["intermediate"], s["heads"], s["kv_heads"], g)
        save_file(t, str(out / fname), metadata={"format": "pt"})
        for k, v in t.items():
            weight_map[k] = fname
            total += v.numel() * v.element_size()
        del t
        shards[idx] = None
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": s["hidden"],
        "intermediate_size": s["intermediate"], "num_hidden_layers": layers, "num_attention_heads": s["heads"],
        "num_key_value_heads": s["kv_heads"], "vocab_size": s["vocab"], "rms_norm_eps": 1e-5,
        "max_position_embeddings": 4096, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return total, layers


def run_quantize(model: str, out: str, method: str, samples: int, seqlen: int, search: int, tokens: int) -> None:
    """The measured child: `method` W4 g128 into the AWQ format."""
    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(int(os.environ.get("LOWBIT_THREADS", "2")))
    from lowbit.quant.awq_config import AwqConfig
    from lowbit.quant.heap import pin_mmap_threshold
    from lowbit.quant.pipeline import quantize

    pin_mmap_threshold()  # as `lowbit quantize` does: the measured child owns its process
    ids = torch.randint(0, SHAPE["vocab"], (samples, seqlen), generator=torch.Generator().manual_seed(0))
    rep = quantize(model, method, 4, 128, fmt="awq", out_dir=out, force=True, calib_ids=ids, calib_samples=samples,
                   calib_seqlen=seqlen, awq_config=AwqConfig(search_samples=search, search_tokens=tokens))
    print(f"quantized {rep.quantized_linears} linears in {rep.total_seconds:.0f} s "
          f"(layers {rep.quantize_seconds:.0f} s, save {rep.save_seconds:.0f} s)", flush=True)


def dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", choices=["awq", "gptq", "awq-gptq"], default="awq")
    ap.add_argument("--min-gib", type=float, default=2.0, help="fp32 checkpoint size to build, GiB (default 2.0)")
    ap.add_argument("--workdir", default="/tmp/lowbit-quant-memory")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--search-samples", type=int, default=4)
    ap.add_argument("--search-tokens", type=int, default=1024)
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints afterwards")
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        run_quantize(a.child[0], a.child[1], a.method, a.samples, a.seqlen, a.search_samples, a.search_tokens)
        return 0

    if not Path("/usr/bin/time").exists():
        print("needs /usr/bin/time: apt-get install time", file=sys.stderr)
        return 1
    work = Path(a.workdir)
    model, out = work / "random-llama-fp32", work / f"random-llama-{a.method}-w4g128"
    t0 = time.perf_counter()
    if (model / "config.json").exists():
        size, layers = dir_bytes(model), json.loads((model / "config.json").read_text())["num_hidden_layers"]
        print(f"reusing {model}")
    else:
        size, layers = make_checkpoint(model, int(a.min_gib * GIB))
        size = dir_bytes(model)
        print(f"wrote {model}: {layers} layers, {size / GIB:.2f} GiB in {time.perf_counter() - t0:.0f} s")
    cmd = ["/usr/bin/time", "-v", sys.executable, __file__, "--child", str(model), str(out), "--method", a.method,
           "--samples", str(a.samples), "--seqlen", str(a.seqlen), "--search-samples", str(a.search_samples),
           "--search-tokens", str(a.search_tokens)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    sys.stdout.write(proc.stdout)
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    wall = re.search(r"Elapsed \(wall clock\) time.*: (.+)", proc.stderr)
    if proc.returncode != 0 or not m:
        sys.stderr.write(proc.stderr[-4000:])
        return 1
    peak = int(m.group(1)) * 1024
    ratio = peak / size
    print(f"checkpoint (fp32): {size / GIB:.3f} GiB, {layers} layers; quantized output: {dir_bytes(out) / GIB:.3f} GiB")
    print(f"peak RSS of the {a.method} quantize process: {peak / GIB:.3f} GiB = {ratio:.3f} x checkpoint "
          f"({'PASS' if ratio < 1 / 3 else 'FAIL'}: goal < 1/3); wall {wall.group(1) if wall else '?'}")
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ratio < 1 / 3 else 2


if __name__ == "__main__":
    sys.exit(main())
