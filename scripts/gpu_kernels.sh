# Sourced by the gpu_*.sh scripts: kernels compiled ahead here (scripts/nvrtc_check.py
# --cache-dir DIR/cache) and carried to the GPU machine, so that flea there loads them
# instead of spending ~30 s of device time in NVRTC. Either CARRY_DIR/cache/*.cubin, or
# CARRY_DIR/cache.tar.xz (`tar -C DIR -cJf cache.tar.xz cache`: the ~10 MB cubin is ~1.2 MB,
# which leaves room in a call's 64 MiB carry). Copies them into $FLEA_CUDA_CACHE (set it
# before sourcing); nothing when neither is there (flea then compiles them itself).
use_carried_kernels() {  # CARRY_DIR
  mkdir -p "$FLEA_CUDA_CACHE" || return 0
  if [ -f "$1/cache.tar.xz" ]; then
    tar -C "$FLEA_CUDA_CACHE" --strip-components=1 -xJf "$1/cache.tar.xz" || true
  elif [ -d "$1/cache" ]; then
    cp -n "$1"/cache/*.cubin "$FLEA_CUDA_CACHE"/ 2>/dev/null || true
  fi
}
