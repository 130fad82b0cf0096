#!/usr/bin/env bash
# The main job on the built-in default model (SmolLM2-135M-Instruct, imported from its GGUF):
#   1. generate text with the full-precision model
#   2. quantize it: AWQ and the RTN baseline, W4 group 64
#   3. perplexity table on WikiText-2 (FP vs RTN vs AWQ)
#   4. serve the AWQ model with the OpenAI-compatible server and send it one chat completion
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
OUT=${LOWBIT_OUT:-$PWD/out}
WINDOWS=${LOWBIT_PPL_WINDOWS:-8}
DATA=../shared/data/wikitext-2-raw/wiki.test.raw
mkdir -p "$OUT"

echo "== 1. generate (default model, full precision)"
lowbit generate --prompt "Explain in one sentence what quantization of a neural network is." --chat --max-tokens 48 --stats

echo "== 2. quantize: AWQ and RTN, W4 g64 (AutoAWQ GEMM format)"
for method in awq rtn; do
  dir="$OUT/smollm2-135m-$method-w4g64"
  if [ -f "$dir/config.json" ]; then echo "$dir exists, reusing it"; continue; fi
  lowbit quantize --method "$method" --w-bit 4 --group-size 64 --format awq --out "$dir"
done

echo "== 3. perplexity, WikiText-2 raw test, seqlen 2048, first $WINDOWS windows"
ds=()
[ -f "$DATA" ] && ds=(--dataset "$DATA")
lowbit eval compare --models smollm2-135m "$OUT/smollm2-135m-rtn-w4g64" "$OUT/smollm2-135m-awq-w4g64" \
  --labels FP RTN-W4g64 AWQ-W4g64 --max-windows "$WINDOWS" "${ds[@]}" --plot "$OUT/ppl.png"

echo "== 4. serve the AWQ model and ask it one question with the openai client"
python scripts/serve_and_ask.py --model "$OUT/smollm2-135m-awq-w4g64"
