"""Does vLLM-CPU load lowbit's SmoothQuant W8A8 checkpoint and agree with lowbit on it? (issue 17)

Eight fixed text prompts, chat-templated and tokenized once with the checkpoint's tokenizer; greedy
continuations of up to --max-tokens tokens (stopping at EOS) from lowbit (W8A8: int8 activations per
token, the checkpoint's own path) and from vLLM-CPU in its peer venv on the same token ids. Prints how
many of the 8 continuations are identical (goal: >= 6) and the first differing position of the others.
If vLLM cannot run the checkpoint, prints the error line vLLM gave.

    python benchmarks/w8a8_vllm_match.py --model out/int8_ppl/smoothquant [--max-tokens 32] [--dtype bfloat16]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.peers.configs import error_line  # noqa: E402

PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that returns the square of a number.",
    "Name three primary colors.",
    "Explain what a CPU cache is in one sentence.",
    "What is 12 times 12?",
    "Give me a synonym for happy.",
    "Translate 'good morning' into Spanish.",
    "What does HTTP stand for?",
]


def lowbit_greedy(model: str, prompts: list[list[int]], max_tokens: int, threads: int) -> list[list[int]]:
    import torch

    from lowbit import LLM, SamplingParams

    torch.set_num_threads(threads)
    outs = LLM(model, dtype="float32").generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens))
    return [list(o.outputs[0].token_ids) for o in outs]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="lowbit's W8A8 checkpoint (compressed-tensors int-quantized)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="bfloat16", help="vLLM's --dtype for the non-quantized parts")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from lowbit.engine.chat_template import apply_chat_template
    from lowbit.models.loader import load_tokenizer

    tok = load_tokenizer(Path(args.model))
    prompts = [apply_chat_template(tok, [{"role": "user", "content": t}]) for t in PROMPTS]
    ours = lowbit_greedy(args.model, prompts, args.max_tokens, args.threads)
    venv_py = ROOT / ".bench-venvs" / "vllm" / "bin" / "python"
    with tempfile.TemporaryDirectory() as d:
        pj = Path(d) / "prompts.json"
        pj.write_text(json.dumps(prompts))
        r = subprocess.run([str(venv_py), str(ROOT / "benchmarks" / "peers" / "vllm_bench.py"), "--hf-dir",
                            args.model, "--mode", "greedy", "--prompts-json", str(pj), "--output-len",
                            str(args.max_tokens), "--dtype", args.dtype, "--input-len", "64",
                            "--max-model-len", "256"], capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        print(f"vLLM-CPU could not run {args.model}: {error_line(r.stderr, r.returncode)}")
        return 1
    theirs = json.loads(r.stdout.strip().splitlines()[-1])["greedy"]
    same = 0
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a == b:
            same += 1
            print(f"prompt {i}: identical ({len(a)} tokens)")
        else:
            k = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            print(f"prompt {i}: differs from token {k} (lowbit {len(a)} tokens, vLLM {len(b)})")
    print(f"greedy continuations identical: {same} of {len(ours)} (goal >= 6); lowbit W8A8 vs vLLM-CPU "
          f"({args.dtype}) on {args.model}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
