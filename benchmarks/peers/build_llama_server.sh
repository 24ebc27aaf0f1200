#!/usr/bin/env bash
# Build llama.cpp's `llama-server` from the llama.cpp sources vendored in the
# llama-cpp-python sdist (the same version as build_llama_cpp.sh), natively for this CPU,
# into benchmarks/.peers/ (gitignored), for benchmarks/serve_generate.py. Never run by CI.
#
# Idempotent: does nothing when benchmarks/.peers/llama-server exists and answers
# --version. About 7-11 minutes on 2 cores.
#
#   benchmarks/peers/build_llama_server.sh            # build if missing
#   FORCE=1 benchmarks/peers/build_llama_server.sh    # rebuild
#
# Environment: LLAMA_CPP_PYTHON_VERSION, PEERS_DIR, PYTHON, JOBS (as build_llama_cpp.sh).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
peers_dir="${PEERS_DIR:-$here/../.peers}"
mkdir -p "$peers_dir"
peers_dir="$(cd "$peers_dir" && pwd)"
version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
python="${PYTHON:-python3}"
jobs="${JOBS:-$(nproc)}"
binary="$peers_dir/llama-server"

if [[ -z "${FORCE:-}" && -x "$binary" ]] && "$binary" --version >/dev/null 2>&1; then
    echo "llama-server already built: $binary"
    exit 0
fi

start=$(date +%s)
src="$peers_dir/src"
rm -rf "$src"
mkdir -p "$src"
"$python" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$src"
tar -xzf "$src"/llama_cpp_python-"$version".tar.gz -C "$src"
llama="$src/llama_cpp_python-$version/vendor/llama.cpp"
log="$peers_dir/llama-server-build.log"
echo "building llama-server (llama-cpp-python $version's llama.cpp, $jobs jobs); log: $log"

cmake_bin=cmake
if ! command -v cmake >/dev/null; then  # a private cmake from PyPI
    "$python" -m venv "$peers_dir/cmake-venv"
    "$peers_dir/cmake-venv/bin/pip" install --quiet cmake
    cmake_bin="$peers_dir/cmake-venv/bin/cmake"
fi
# Native ISA, static (one file to copy), no GPU backends, no network; AMX compiled out as in
# build_llama_cpp.sh (it crashes on Q4_K repacking on CPUs that have it).
flags=""
if [[ -z "${LLAMA_CPP_AMX:-}" ]] && grep -qw amx_int8 /proc/cpuinfo 2>/dev/null; then
    flags="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
fi
"$cmake_bin" -S "$llama" -B "$llama/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
    -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \
    -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_BLAS=OFF \
    -DCMAKE_C_FLAGS="$flags" -DCMAKE_CXX_FLAGS="$flags" > "$log" 2>&1 &&
"$cmake_bin" --build "$llama/build" --target llama-server -j "$jobs" >> "$log" 2>&1 || {
    echo "build failed; last lines of $log:" >&2
    tail -40 "$log" >&2
    exit 1
}
cp "$llama/build/bin/llama-server" "$binary"
"$binary" --version
echo "built $binary in $(( $(date +%s) - start )) s"
