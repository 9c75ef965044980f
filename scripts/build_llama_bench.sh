#!/usr/bin/env bash
# Builds llama.cpp's `llama-bench` for the lent GPU machine HERE (no GPU or CUDA toolkit
# needed: the toolkit comes from NVIDIA's pip wheels), with its FlashAttention kernels, for
# sm_90 and CUDA 13, from the llama.cpp vendored in llama-cpp-python 0.3.36 (the version the
# fixtures use), and leaves it stripped and xz-compressed (~41 MB) for `carry`:
# scripts/gpu_compare.sh LLAMA_BENCH=xz, or by hand (`xz -dc ... > llama-bench`, run with
# LD_LIBRARY_PATH=/usr/local/cuda/lib64). ~20-50 min on 2 cores.
#
# usage: scripts/build_llama_bench.sh OUT_FILE [WORK_DIR]   (WORK_DIR: /tmp/llama-bench-build)
# CONFIGURE_ONLY=1 stops after cmake's configure step (a quick check of the set-up).
set -euo pipefail
OUT=${1:?usage: build_llama_bench.sh OUT_FILE [WORK_DIR]}
WORK=${2:-/tmp/llama-bench-build}
LLAMA_CPP_PYTHON=0.3.36
# cmake and ninja from pip where the machine lacks them (the dev machine has neither).
for tool in cmake ninja; do
  command -v "$tool" > /dev/null || python3 -m pip install --quiet "$tool"
done
mkdir -p "$WORK/whl" "$WORK/wheels"
cd "$WORK"

# 1. A CUDA 13.0 toolkit from wheels: nvcc (+ crt, nvvm), the runtime, CCCL headers, cuBLAS.
wheels=(nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
  nvidia-cuda-cccl==13.0.85 nvidia-cuda-runtime==13.0.96 nvidia-cublas==13.10.0.20)
if [ ! -x cuda/bin/nvcc ]; then
  pip download --quiet --no-deps --only-binary=:all: --dest whl "${wheels[@]}"
  for w in whl/*.whl; do python3 -m zipfile -e "$w" wheels/; done
  rm -rf cuda && mkdir -p cuda
  for d in bin include lib nvvm; do cp -r "wheels/nvidia/cu13/$d" cuda/; done
  chmod +x cuda/bin/* cuda/nvvm/bin/*
  # CMake's FindCUDAToolkit wants lib64 and unversioned shared libraries.
  mkdir -p cuda/lib64
  cp -r cuda/lib/. cuda/lib64/
  for so in cuda/lib64/*.so.*; do
    ln -sf "$(basename "$so")" "${so%%.so.*}.so"
  done
fi

# 2. llama.cpp as vendored by llama-cpp-python.
SRC="$WORK/llama_cpp_python-$LLAMA_CPP_PYTHON"
if [ ! -d "$SRC/vendor/llama.cpp" ]; then
  # The sdist straight from PyPI (pip download would prepare its metadata, building its
  # build dependencies).
  python3 - "$LLAMA_CPP_PYTHON" "$WORK/llama-cpp-python.tar.gz" <<'PY'
import json, sys, urllib.request
version, dest = sys.argv[1], sys.argv[2]
req = urllib.request.Request("https://pypi.org/simple/llama-cpp-python/",
                             headers={"Accept": "application/vnd.pypi.simple.v1+json"})
files = json.load(urllib.request.urlopen(req, timeout=120))["files"]
url = next(f["url"] for f in files if f["filename"] == f"llama_cpp_python-{version}.tar.gz")
urllib.request.urlretrieve(url, dest)
PY
  tar -C "$WORK" -xzf "$WORK/llama-cpp-python.tar.gz"
fi

# 3. Configure and build: CUDA on for sm_90 with FlashAttention kernels, the CPU side for
# AVX2 (the lent machine's cores have it; GGML_NATIVE would tune for this machine's), static.
cmake -G Ninja -S "$SRC/vendor/llama.cpp" -B build -DCMAKE_BUILD_TYPE=Release \
  -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_CUDA_FA=ON -DGGML_CUDA_NO_VMM=ON \
  -DCMAKE_CUDA_COMPILER="$WORK/cuda/bin/nvcc" -DCUDAToolkit_ROOT="$WORK/cuda" \
  -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF > cmake.log 2>&1 || {
  tail -20 cmake.log
  exit 1
}
[ "${CONFIGURE_ONLY:-0}" = 1 ] && { echo "configured: $WORK/build"; exit 0; }
ninja -C build llama-bench > build.log 2>&1 || {
  tail -20 build.log
  exit 1
}
strip -o "$WORK/llama-bench" build/bin/llama-bench
xz -T0 -6 -c "$WORK/llama-bench" > "$OUT"
ls -l "$OUT"
