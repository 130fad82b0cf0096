#!/usr/bin/env bash
# OpenAI-compatible vLLM (CPU) server on 127.0.0.1:PORT for the serving benchmark (foreground; stop it
# with SIGTERM/Ctrl-C). Needs benchmarks/peers/setup_peers.sh vllm. Startup takes minutes on 2 cores
# (torch.compile of the model, warm-up): poll GET /health until it answers 200.
# Usage: benchmarks/peers/serve_vllm.sh PORT HF_DIR [extra `vllm serve` args...]
# Env:
#   VLLM_CPU_KVCACHE_SPACE=2        KV cache GiB          VLLM_MAX_MODEL_LEN=2048
#   VLLM_CPU_NUM_OF_RESERVED_CPU=0  use every core        VLLM_PRELOAD=iomp|gomp|none (default iomp)
#   SERVED_MODEL_NAME (default: HF_DIR as given, vLLM's default)   PEER_VENVS
#   VLLM_DTYPE (default: bfloat16 where /proc/cpuinfo has avx512_bf16 or amx_bf16, else float32: vLLM-CPU's
#              fastest on this CPU, the rule of benchmarks/peers/configs.py; an AWQ checkpoint needs bfloat16)
set -euo pipefail
if [ $# -lt 2 ]; then sed -n 2,11p "$0" >&2; exit 2; fi
PORT=$1; HF_DIR=$2; shift 2
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
VENV=${PEER_VENVS:-$ROOT/.bench-venvs}/vllm
[ -x "$VENV/bin/python" ] || { echo "no $VENV: run benchmarks/peers/setup_peers.sh vllm" >&2; exit 2; }
[ -f "$HF_DIR/config.json" ] || { echo "no HF model dir: $HF_DIR" >&2; exit 2; }
export VLLM_CPU_NUM_OF_RESERVED_CPU=${VLLM_CPU_NUM_OF_RESERVED_CPU:-0}
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2}
export VLLM_CPU_OMP_THREADS_BIND=${VLLM_CPU_OMP_THREADS_BIND:-auto}
export VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# vLLM's CPU guide: LD_PRELOAD tcmalloc + Intel OpenMP (the venv's libiomp5 from intel-openmp).
pre=()
for f in /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4; do [ -f "$f" ] && pre+=("$f"); done
case "${VLLM_PRELOAD:-iomp}" in
  iomp) [ -f "$VENV/lib/libiomp5.so" ] && pre+=("$VENV/lib/libiomp5.so") ;;
  gomp) for f in "$VENV"/lib/python3*/site-packages/torch.libs/libgomp*.so* "$VENV"/lib/python3*/site-packages/torch/lib/libgomp*.so*; do
          [ -f "$f" ] && { pre+=("$f"); break; }; done ;;
  none) pre=() ;;
esac
if [ ${#pre[@]} -gt 0 ]; then
  LD_PRELOAD="$(IFS=:; echo "${pre[*]}")${LD_PRELOAD:+:$LD_PRELOAD}"; export LD_PRELOAD
fi
if [ -z "${VLLM_DTYPE:-}" ]; then
  if grep -m1 '^flags' /proc/cpuinfo | grep -qwE 'avx512_bf16|amx_bf16'; then VLLM_DTYPE=bfloat16; else VLLM_DTYPE=float32; fi
fi
echo "serve_vllm.sh: dtype $VLLM_DTYPE" >&2
name=()
[ -n "${SERVED_MODEL_NAME:-}" ] && name=(--served-model-name "$SERVED_MODEL_NAME")
# Not `vllm serve`: vllm-cpu 0.32.0's CLI asks importlib.metadata for a distribution named "vllm" and dies
# with PackageNotFoundError (its distribution is "vllm-cpu"). The OpenAI server module is the same server
# (vLLM marks this entry point deprecated, with a DeprecationWarning).
exec "$VENV/bin/python" -m vllm.entrypoints.openai.api_server --model "$HF_DIR" \
  --host 127.0.0.1 --port "$PORT" --dtype "$VLLM_DTYPE" \
  --max-model-len "${VLLM_MAX_MODEL_LEN:-2048}" "${name[@]}" "$@"
