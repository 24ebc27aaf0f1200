#!/usr/bin/env bash
# Build llama-cpp-python from source, natively for this CPU, into its own venv
# under benchmarks/.peers/ (gitignored), for benchmarks/generate.py.
#
# Idempotent: does nothing when the venv was built with this version and these
# CMake arguments (recorded in benchmarks/.peers/build.stamp) and imports
# llama_cpp; otherwise builds a fresh venv. About 8-11 minutes on 2 cores.
#
#   benchmarks/peers/build_llama_cpp.sh            # build if missing
#   FORCE=1 benchmarks/peers/build_llama_cpp.sh    # rebuild
#
# Environment:
#   LLAMA_CPP_PYTHON_VERSION  version to build (default below)
#   PEERS_DIR                 where the venv goes (default benchmarks/.peers)
#   PYTHON                    interpreter for the venv (default python3)
#   JOBS                      parallel compile jobs (default: nproc)
#   EXTRA_CMAKE_ARGS          appended to the CMake arguments
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
peers_dir="${PEERS_DIR:-$here/../.peers}"
mkdir -p "$peers_dir"
peers_dir="$(cd "$peers_dir" && pwd)"
venv="$peers_dir/venv"
version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
python="${PYTHON:-python3}"
jobs="${JOBS:-$(nproc)}"

# Native CPU build (-march=native: AVX2/FMA/AVX-512... as this machine has), every GPU
# backend off, no BLAS (ggml's own kernels, as llama-batched-bench uses them).
cmake_args="-DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF \
-DGGML_HIP=OFF -DGGML_SYCL=OFF -DGGML_OPENCL=OFF -DGGML_BLAS=OFF \
-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF"
# On CPUs with AMX (Sapphire Rapids and later) -march=native also compiles ggml's AMX
# backend, which repacks Q4_K weights and segfaults in ggml_backend_amx_mul_mat on the first
# decode (llama.cpp issue #20824; seen here with Gemma 3 270M Q4_K_M). Compile AMX out, keep
# the rest of the native ISA (AVX-512, VNNI, the CPU repack kernels). LLAMA_CPP_AMX=1 keeps it.
if [[ -z "${LLAMA_CPP_AMX:-}" ]] && grep -qw amx_int8 /proc/cpuinfo 2>/dev/null; then
    no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    cmake_args="$cmake_args -DCMAKE_C_FLAGS='$no_amx' -DCMAKE_CXX_FLAGS='$no_amx'"
fi
cmake_args="$cmake_args ${EXTRA_CMAKE_ARGS:-}"
stamp="$peers_dir/build.stamp"
want="llama-cpp-python==$version $cmake_args"

# Built already, with this version and these arguments, and the library loads: done.
if [[ -z "${FORCE:-}" && -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]] &&
   "$venv/bin/python" -c "import llama_cpp" 2>/dev/null; then
    echo "llama-cpp-python $version already built in $venv"
    exit 0
fi

echo "building llama-cpp-python $version in $venv ($jobs jobs): CMAKE_ARGS=$cmake_args"
start=$(date +%s)
rm -rf "$stamp" "$venv"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip

export CMAKE_ARGS="$cmake_args"
export CMAKE_BUILD_PARALLEL_LEVEL="$jobs"
export FORCE_CMAKE=1

"$venv/bin/python" -m pip install --no-cache-dir --no-binary llama-cpp-python \
    --verbose "llama-cpp-python==$version" > "$peers_dir/build.log" 2>&1 || {
    echo "build failed; last lines of $peers_dir/build.log:" >&2
    tail -40 "$peers_dir/build.log" >&2
    exit 1
}
"$venv/bin/python" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__)"
echo "$want" > "$stamp"
echo "built in $(( $(date +%s) - start )) s; log: $peers_dir/build.log"
