#!/usr/bin/env bash
# GPU streaming checks and benchmarks on the lent machine (builds nothing; no cargo there).
#
# usage: scripts/gpu_stream.sh OUTDIR [CARRY_DIR]
#   CARRY_DIR/flea      target/release/flea built with --features cuda
#   CARRY_DIR/tests/*   flea-cuda test executables (cargo test -p flea-cuda --release --no-run)
#   CARRY_DIR/cache/*.cubin  optional: kernels compiled ahead (or cache.tar.xz; gpu_kernels.sh)
# Environment: PRESETS (default "7b 13b"), STAGES (default "tests resident budget nores cold").
# Writes logs.tar.gz (one .err/.json/.out per run) and the SVG timelines into OUTDIR; prints a
# summary last.
set -u
OUT=${1:?usage: gpu_stream.sh OUTDIR [CARRY_DIR]}
CARRY=${2:-carry}
PRESETS=${PRESETS:-"7b 13b"}
STAGES=${STAGES:-"tests resident budget nores cold"}
F=$CARRY/flea
M=${MODELS_DIR:-/tmp/flea-models}
mkdir -p "$OUT/logs" "$M"
OUT=$(cd "$OUT" && pwd)
FINAL=$OUT
OUT=$OUT/logs
export FLEA_CUDA_CACHE=${FLEA_CUDA_CACHE:-/tmp/flea-cuda-kernels}
# Kernels compiled ahead (CARRY_DIR/cache or cache.tar.xz): no NVRTC time here.
. "$(dirname "$0")/gpu_kernels.sh"
use_carried_kernels "$CARRY"
THREADS=${THREADS:-$(nproc)}
has() { [[ " $STAGES " == *" $1 "* ]]; }
# VRAM budget of the "budget" runs per preset (the issue's: 13b 4 GiB, 70b 8 GiB).
declare -A BUDGET=([7b]=2GiB [13b]=4GiB [34b]=6GiB [70b]=8GiB)

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,pcie.link.gen.current,pcie.link.width.current,clocks.sm,clocks.mem,temperature.gpu --format=csv 2>&1
  nproc; free -g | head -2
} > "$OUT/device.txt"

if has tests; then
  for t in "$CARRY"/tests/*; do
    [ -x "$t" ] || continue
    n=$(basename "$t" | sed 's/-[0-9a-f]*$//')
    FLEA_CUDA_REPORT="$OUT" "$t" --nocapture --test-threads=1 > "$OUT/test-$n.log" 2>&1 \
      && echo "TEST $n: ok" || echo "TEST $n: FAILED"
  done
fi

for p in $PRESETS; do
  [ -s "$M/$p.gguf" ] || "$F" synth --preset "$p" "$M/$p.gguf" > "$OUT/synth-$p.log" 2>&1
done

# A prompt text; its token count is printed by each run.
LONG=$(python3 -c "print(' '.join(['the quick brown fox jumps over the lazy dog and'] * 25))")
SHORT="the quick brown fox jumps over the lazy dog"
# run NAME MODEL [flea run flags...]: one generation, stats to NAME.json, stderr to NAME.err.
run() {
  local name=$1 model=$2; shift 2
  local PROMPT=${PROMPT:-$LONG}
  local t0=$SECONDS
  "$F" run -m "$model" -p "$PROMPT" --temp 0 --ignore-eos -t "$THREADS" --device cuda \
    --stats-json "$OUT/$name.json" "$@" > "$OUT/$name.out" 2> "$OUT/$name.err"
  local rc=$?
  local vram
  vram=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader 2>/dev/null | head -1)
  echo "RUN $name rc=$rc ($((SECONDS - t0)) s): $(grep -E '^prompt:' "$OUT/$name.err" | tail -1)"
  grep -E '^residency:|^error' "$OUT/$name.err" | tail -2 | sed 's/^/    /'
}

for p in $PRESETS; do
  m=$M/$p.gguf
  if has resident; then
    run "$p-resident" "$m" -n 128 --ctx 1024
    run "$p-inplace" "$m" -n 128 --ctx 1024 --in-place
  fi
  if has budget; then
    B=${BUDGET[$p]:-4GiB}
    run "$p-budget-hybrid" "$m" -n 32 --ctx 1024 --vram-budget "$B" --hybrid --trace "$OUT/$p-hybrid.svg"
    run "$p-budget-stream" "$m" -n 32 --ctx 1024 --vram-budget "$B" --hybrid off
  fi
  if has nores; then
    # No room for resident layers: every layer copied from the pinned host cache each token.
    PROMPT=$SHORT run "$p-nores" "$m" -n 32 --ctx 256 -b 64 --vram-budget 1GiB --hybrid off --trace "$OUT/$p-nores.svg"
  fi
  if has cold; then
    # Streamed from disk with the page cache dropped (RAM budget too small to cache).
    sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null
    PROMPT=$SHORT run "$p-cold" "$m" -n 3 --ctx 256 -b 64 --vram-budget 2GiB --ram-budget 1GiB --hybrid off --trace "$OUT/$p-cold.svg"
    sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null
    dd if="$m" of=/dev/null bs=4M iflag=direct count=1000 2> "$OUT/$p-dd.txt"
    echo "DD $p: $(tail -1 "$OUT/$p-dd.txt")"
    # The disk's own O_DIRECT sweep (pread chunk sizes, io_uring block sizes x queue depths):
    # the cold run's read rate set beside the best reader, not only beside dd's queue depth 1.
    sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null
    "$F" probe --file "$m" --quick --save "$OUT/$p-profile.json" > "$OUT/$p-probe.log" 2>&1
    echo "PROBE $p: $(grep -o 'best disk read: [^;]*' "$OUT/$p-probe.log" | tail -1)"
  fi
done

cp "$OUT"/*.svg "$FINAL"/ 2>/dev/null
tar -C "$OUT" -czf "$FINAL/logs.tar.gz" . && rm -rf "$OUT"
