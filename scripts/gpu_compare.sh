#!/usr/bin/env bash
# flea beside llama.cpp's CUDA build on the lent GPU machine, same model, same card, same call.
#
# usage: scripts/gpu_compare.sh OUTDIR [CARRY_DIR]
#   CARRY_DIR/flea                          target/release/flea (--features cuda)
#   CARRY_DIR/cache/*.cubin                 optional: kernels compiled ahead (or cache.tar.xz; gpu_kernels.sh)
#   CARRY_DIR/llama_cpp_python-slim.tar.gz  + wheels, run_remote.sh, quick_bench.py: see
#                                           ../shared/tools/llamacpp-gpu/README.md
# Environment: PRESET (13b), NGLS (llama.cpp layer counts, "41 20"), BUDGETS (flea VRAM budgets,
# "all 4GiB"), MODES ("stream hybrid"), GEN (32), FLEA_ARGS (extra flea run flags). NGLS="" skips llama.cpp. llama.cpp is built once per warm machine (~4 min) under /tmp/llcpp.
# LLAMA_BENCH=PATH instead runs that llama-bench (e.g. built here with its FlashAttention
# kernels, carried xz-compressed as CARRY_DIR/llama-bench-fa.xz: LLAMA_BENCH=xz) with -fa 1:
# pp512 from an empty cache, its decode after 512 tokens of context as flea's (-d 512), its
# VRAM peak sampled by nvidia-smi; no llama-cpp-python build then.
set -u
OUT=${1:?usage: gpu_compare.sh OUTDIR [CARRY_DIR]}
CARRY=$(cd "${2:-carry}" && pwd)
PRESET=${PRESET:-13b}
NGLS=${NGLS-"41 20"}  # (set but empty: no llama.cpp)
BUDGETS=${BUDGETS:-"all 4GiB"}
GEN=${GEN:-32}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
M=/tmp/flea-models/$PRESET.gguf
mkdir -p /tmp/flea-models
export FLEA_CUDA_CACHE=/tmp/flea-cuda-kernels
# Kernels compiled ahead (CARRY_DIR/cache or cache.tar.xz): no NVRTC time here.
. "$(dirname "$0")/gpu_kernels.sh"
use_carried_kernels "$CARRY"
THREADS=$(nproc)

# 1. llama.cpp's CUDA build (skipped when a warm machine already has it, or with LLAMA_BENCH).
LLAMA_BENCH=${LLAMA_BENCH:-}
if [ "$LLAMA_BENCH" = xz ]; then
  xz -dc "$CARRY/llama-bench-fa.xz" > /tmp/llama-bench-fa && chmod +x /tmp/llama-bench-fa
  LLAMA_BENCH=/tmp/llama-bench-fa
fi
if [ -n "$NGLS" ] && [ -z "$LLAMA_BENCH" ] && ! ls /tmp/llcpp/site/llama_cpp >/dev/null 2>&1; then
  (cd "$CARRY" && CARRY=$CARRY OUT="$OUT/llcpp" FA_BUILD=off bash run_remote.sh env build > "$OUT/llcpp-build.log" 2>&1)
  echo "llama.cpp build: $(tail -1 "$OUT/llcpp-build.log")"
fi
[ -s "$M" ] || "$CARRY/flea" synth --preset "$PRESET" "$M" > "$OUT/synth.log" 2>&1

# 2. flea: prompt of ~500 tokens in one pass, then GEN decode tokens; ctx 768 as quick_bench.
PROMPT=$(python3 -c "print(' '.join(['the quick brown fox jumps over the lazy dog and'] * 24))")
for b in $BUDGETS; do
  for mode in ${MODES:-stream hybrid}; do
    [ "$b" = all ] && [ "$mode" = hybrid ] && continue
    extra=(${FLEA_ARGS:-})
    [ "$b" != all ] && extra+=(--vram-budget "$b")
    [ "$mode" = hybrid ] && [ "$b" != all ] && extra+=(--hybrid on)
    [ "$mode" = stream ] && extra+=(--hybrid off)
    name=flea-$PRESET-$b-$mode${TAG:-}
    "$CARRY/flea" run -m "$M" -p "$PROMPT" -n "$GEN" --temp 0 --ignore-eos -t "$THREADS" --ctx 768 \
      --device cuda --stats-json "$OUT/$name.json" "${extra[@]}" > /dev/null 2> "$OUT/$name.err"
    echo "FLEA $PRESET budget=$b $mode ${TAG:-}: $(grep -E '^prompt:' "$OUT/$name.err" | tail -1)"
    grep -E '^residency|^error' "$OUT/$name.err" | sed 's/^/    /'
  done
done

# 3. llama.cpp, all cores, same model.
export PYTHONPATH=/tmp/llcpp/site:/tmp/llcpp/site_prebuilt:/tmp/llcpp/pydeps
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
for ngl in $NGLS; do
  if [ -n "$LLAMA_BENCH" ]; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$OUT/llama-$ngl.smi" 2>/dev/null &
    smi=$!
    # Its prompt from an empty cache, its decode after 512 tokens (flea's after its prompt).
    { "$LLAMA_BENCH" -m "$M" -p 512 -n 0 -fa 1 -ngl "$ngl" -t "$THREADS" -r 3 -o md
      "$LLAMA_BENCH" -m "$M" -p 0 -n "$GEN" -d 512 -fa 1 -ngl "$ngl" -t "$THREADS" -r 3 -o md
    } > "$OUT/llama-$ngl.md" 2> "$OUT/llama-$ngl.err"
    kill "$smi" 2>/dev/null; wait "$smi" 2>/dev/null
    peak=$(sort -n "$OUT/llama-$ngl.smi" | tail -1)
    echo "LLAMA.CPP $PRESET ngl=$ngl (llama-bench -fa 1, tg after 512 tokens; nvidia-smi peak ${peak:-?} MiB):"
    grep -E "pp512|tg$GEN" "$OUT/llama-$ngl.md" | sed 's/^/    /'
  else
    echo "LLAMA.CPP $PRESET ngl=$ngl: $(python3 "$CARRY/quick_bench.py" "$M" "$ngl" "$THREADS" "$GEN" 2> "$OUT/llama-$ngl.err" | tail -1)"
  fi
done
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,clocks_throttle_reasons.active --format=csv > "$OUT/gpu-after.csv" 2>&1
