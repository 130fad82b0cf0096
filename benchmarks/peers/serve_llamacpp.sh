#!/usr/bin/env bash
# OpenAI-compatible llama.cpp server on 127.0.0.1:PORT for the serving benchmark (runs in the foreground;
# stop it with SIGTERM/Ctrl-C). Needs benchmarks/peers/setup_peers.sh llamacpp.
# Usage: benchmarks/peers/serve_llamacpp.sh PORT GGUF [extra server args...]
# Env:
#   LLAMACPP_ENGINE=server  (default) llama.cpp's native llama-server: --parallel slots, continuous batching
#                  =python  llama-cpp-python's server (python -m llama_cpp.server): ONE request at a time
#   LLAMACPP_THREADS=2         threads for generation and for prompt processing (-t / -tb)
#   LLAMACPP_PARALLEL=64       server slots (concurrent sequences in one batch)
#   LLAMACPP_CTX_PER_SLOT=1024 context per slot; total context = PARALLEL * CTX_PER_SLOT (unified KV cache)
#   LLAMA_SERVER_BIN, PEER_VENVS  to point at other builds
# Endpoints: /v1/completions, /v1/chat/completions, /v1/models, /health (native also /completion, /metrics).
set -euo pipefail
if [ $# -lt 2 ]; then sed -n 2,14p "$0" >&2; exit 2; fi
PORT=$1; GGUF=$2; shift 2
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
VENV=${PEER_VENVS:-$ROOT/.bench-venvs}/llamacpp
ENGINE=${LLAMACPP_ENGINE:-server}
THREADS=${LLAMACPP_THREADS:-2}
PARALLEL=${LLAMACPP_PARALLEL:-64}
CTX_PER_SLOT=${LLAMACPP_CTX_PER_SLOT:-1024}
[ -f "$GGUF" ] || { echo "no such GGUF: $GGUF" >&2; exit 2; }
case "$ENGINE" in
  server)
    BIN=${LLAMA_SERVER_BIN:-$VENV/bin/llama-server}
    [ -x "$BIN" ] || { echo "no $BIN: run benchmarks/peers/setup_peers.sh llamacpp" >&2; exit 2; }
    # --cache-ram 0: no host-memory prompt cache (a benchmark must not replay cached prompts);
    # --kv-unified: all slots share one KV buffer of PARALLEL*CTX_PER_SLOT tokens;
    # --no-webui: no UI assets (none were built). The GGUF's name is the model id in /v1/models.
    exec "$BIN" -m "$GGUF" --host 127.0.0.1 --port "$PORT" \
      -t "$THREADS" -tb "$THREADS" -np "$PARALLEL" -c $((PARALLEL * CTX_PER_SLOT)) \
      --cont-batching --kv-unified --cache-ram 0 --no-webui --metrics \
      -b 2048 -ub 512 "$@"
    ;;
  python)
    exec "$VENV/bin/python" -m llama_cpp.server --model "$GGUF" --host 127.0.0.1 --port "$PORT" \
      --n_threads "$THREADS" --n_threads_batch "$THREADS" --n_ctx "$CTX_PER_SLOT" --verbose False "$@"
    ;;
  *) echo "LLAMACPP_ENGINE must be server or python" >&2; exit 2 ;;
esac
