"""What a quantized KV cache costs: WikiText-2 perplexity of the default model with its attention
served from an fp32 / bf16 / int8 / int4 paged KV pool (raw test, seqlen 2048, first 16 windows).

Every window runs through the engine's real KV path (lowbit.eval.kv_perplexity): KVCachePool +
build_paged_context + model forward, `--chunk` tokens per step, each query reading only the stored
(quantized) keys and values, exactly what a decode step sees. The result is deterministic (no
timing, no sampling). Also printed: KV bytes per token (scales included) and how many tokens a
512 MiB pool holds, as the engine sizes it. Acceptance: int8 within 1% of fp32, int4 within 5%.
`--matmul-dtype bfloat16` runs the linears in bf16 too (the engine's `--dtype bfloat16`, whose KV
cache is bf16 under auto); the fp32 row is then measured with fp32 linears, so a bf16 row is the
whole bf16 configuration against the fp32 one (acceptance: within 0.5%).

Run:  python benchmarks/kv_cache_ppl.py [--windows 16] [--dtypes fp32,bf16,int8,int4] [--chunk 256]
                                        [--matmul-dtype bfloat16]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
LIMITS = {"bf16": 0.5, "int8": 1.0, "int4": 5.0}  # max |Δppl| in % vs the fp32 KV cache


def main() -> int:
    from lowbit.eval.kv_perplexity import kv_spec_for, perplexity_with_kv_cache, tokens_per_budget
    from lowbit.eval.perplexity import perplexity, read_eval_text, tokenize_stream
    from lowbit.quant.loader import load_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: the built-in default model")
    ap.add_argument("--dataset", default=str(DATA))
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=256, help="tokens per step (the result does not depend on it)")
    ap.add_argument("--dtypes", default="fp32,int8,int4")
    ap.add_argument("--plain", action="store_true", help="also run the plain (cache-free) perplexity")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--matmul-dtype", choices=["float32", "bfloat16"], default="float32",
                    help="the linears of every non-fp32 KV row (the fp32 row always runs fp32 linears)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    lm = load_model(a.model)
    ids = tokenize_stream(lm.tokenizer, read_eval_text(a.dataset))
    budget = 512 * 2**20
    print(f"model {lm.path}  dataset {Path(a.dataset).name}  seqlen {a.seqlen}  windows {a.windows}  chunk {a.chunk}",
          flush=True)
    if a.plain:
        r = perplexity(lm.model, ids, a.seqlen, a.windows)
        print(f"plain forward (no KV cache): ppl {r.ppl:.4f}  ({r.seconds:.0f} s)", flush=True)
    rows = []
    bf16_model = None
    for dt in a.dtypes.split(","):
        target = lm
        if a.matmul_dtype == "bfloat16" and dt != "fp32":
            if bf16_model is None:
                import copy

                from lowbit.layers.linear_bf16 import use_bf16

                bf16_model = copy.deepcopy(lm.model)
                use_bf16(bf16_model)
            target = bf16_model
        r = perplexity_with_kv_cache(target, ids, seqlen=a.seqlen, max_windows=a.windows, kv_cache_dtype=dt,
                                     chunk=a.chunk, progress=True)
        rows.append(r)
        print(f"  {r.kv_cache_dtype}: ppl {r.ppl:.4f}  ({r.seconds:.0f} s)", flush=True)
    base = next((r for r in rows if r.kv_cache_dtype == "fp32"), None)
    fp32_tokens = tokens_per_budget(kv_spec_for(lm.model, "fp32"), budget)
    print()
    print(f"{'kv dtype':<9}{'ppl':>10}{'Δ% vs fp32':>12}{'B/token':>9}{'tokens/512MiB':>15}{'x fp32':>8}  check")
    ok = True
    for r in rows:
        toks = tokens_per_budget(kv_spec_for(lm.model, r.kv_cache_dtype), budget)
        delta = 100 * (r.ppl / base.ppl - 1) if base else float("nan")
        limit = LIMITS.get(r.kv_cache_dtype)
        verdict = "" if limit is None or base is None else ("ok" if abs(delta) < limit else f"FAIL (>= {limit}%)")
        ok &= not verdict.startswith("FAIL")
        print(f"{r.kv_cache_dtype:<9}{r.ppl:>10.4f}{delta:>+11.3f}%{r.bytes_per_token:>9}{toks:>15}"
              f"{toks / fp32_tokens:>7.2f}x  {verdict}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
