#!/usr/bin/env bash
# GPU checks of the CUDA backend on a machine with a CUDA device (no cargo needed there).
#
# usage: scripts/gpu_checks.sh OUTDIR [CARRY_DIR]
#
# Builds nothing. CARRY_DIR (default: carry/) must hold prebuilt binaries:
#   CARRY_DIR/tests/*          flea-cuda test executables (cargo test -p flea-cuda --release
#                              --no-run --message-format=json lists their paths)
#   CARRY_DIR/flea-cuda-bench  target/release/flea-cuda-bench
#   CARRY_DIR/flea             target/release/flea (for `flea synth`)
#   CARRY_DIR/cache/*.cubin    optional: kernels compiled ahead (or cache.tar.xz; gpu_kernels.sh)
#   CARRY_DIR/mmvq_bench       optional: target/release/examples/mmvq_bench
#                              (cargo build --release -p flea-cuda --example mmvq_bench)
# Writes into OUTDIR: device.txt, tests.log, tests_scalar.log, tests_mmvq.log, parity.jsonl,
# synth.log, bench.log, bench.json, run.log (and each run's text and stderr), serve.log,
# mmvq_bench.log, summary.txt (which holds the others' results in brief: where a call returns
# only a few files, write OUTDIR elsewhere and bring back summary.txt). Environment: PRESETS
# (default "7b 13b"), TOKENS (128), PROMPT (512), MMVQ_VARIANTS (1; 0 skips step 1c), RUNS
# (2, steps 3b-3d), REAL_SHAPES (1; 0 skips step 3d), SERVE (1; 0 skips step 3e), DEVICE
# (cuda; cpu to try the script).
set -u
OUT=${1:?usage: gpu_checks.sh OUTDIR [CARRY_DIR]}
CARRY=${2:-carry}
PRESETS=${PRESETS:-"7b 13b"}
TOKENS=${TOKENS:-128}
PROMPT=${PROMPT:-512}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export FLEA_CUDA_CACHE=${FLEA_CUDA_CACHE:-/tmp/flea-cuda-kernels}
# Kernels compiled ahead (CARRY_DIR/cache or cache.tar.xz): no NVRTC time here.
. "$(dirname "$0")/gpu_kernels.sh"
use_carried_kernels "$CARRY"
status=0

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.memory --format=csv 2>&1
  ls -l "$CARRY" "$CARRY/tests" 2>&1
} > "$OUT/device.txt"

# 1. Tests (parity vs the CPU backend on synthetic models; one JSON line per case).
rm -f "$OUT/parity.jsonl"
: > "$OUT/tests.log"
for t in "$CARRY"/tests/*; do
  [ -x "$t" ] || continue
  echo "=== $(basename "$t")" >> "$OUT/tests.log"
  start=$SECONDS
  if ! FLEA_CUDA_REPORT="$OUT" "$t" --nocapture --test-threads=1 >> "$OUT/tests.log" 2>&1; then
    status=1
    echo "FAILED: $(basename "$t")" >> "$OUT/tests.log"
  fi
  echo "=== $(basename "$t") took $((SECONDS - start)) s" >> "$OUT/tests.log"
done

# 1b. The same comparisons against the CPU's scalar reference kernels (FLEA_QUANT_ISA=scalar),
# which tells a CUDA kernel bug from a CPU SIMD one.
: > "$OUT/tests_scalar.log"
for t in "$CARRY"/tests/*; do
  [ -x "$t" ] || continue
  FLEA_QUANT_ISA=scalar "$t" --nocapture --test-threads=1 ops_match_cpu every_type_matches_cpu \
    >> "$OUT/tests_scalar.log" 2>&1 || echo "FAILED (scalar CPU reference): $(basename "$t")" >> "$OUT/tests_scalar.log"
done

# 1c. The kernel variants the default run does not reach: two rows per warp
# (FLEA_CUDA_MMVQ_ROWS=2), 8-token groups for whole prompts (FLEA_CUDA_NO_CUBLAS=1), few-token
# matmuls without the tensor-core kernels (FLEA_CUDA_NO_MMQ=1), one-token
# mat-vecs reading their activations from global memory (FLEA_CUDA_FUSE_OFF=mmvq_sa), Q6_K's
# shared-activation kernel one row a warp (FLEA_CUDA_FUSE_OFF=mmvq_sa_rows), the mat-vecs
# without their whole-row and 4-step Q6_K kernels (FLEA_CUDA_FUSE_OFF=mmvq_whole_row,
# mmvq_q6_steps), and the per-row prompt attention (FLEA_CUDA_FUSE_OFF=attn_tiled).
: > "$OUT/tests_mmvq.log"
for t in "$CARRY"/tests/*; do
  [ -x "$t" ] && [ "${MMVQ_VARIANTS:-1}" != 0 ] || continue
  FLEA_CUDA_MMVQ_ROWS=2 "$t" --nocapture --test-threads=1 ops_match_cpu every_type_matches_cpu \
    >> "$OUT/tests_mmvq.log" 2>&1 || { status=1; echo "FAILED (FLEA_CUDA_MMVQ_ROWS=2): $(basename "$t")" >> "$OUT/tests_mmvq.log"; }
  FLEA_CUDA_NO_CUBLAS=1 "$t" --nocapture --test-threads=1 ops_match_cpu every_type_matches_cpu \
    >> "$OUT/tests_mmvq.log" 2>&1 || { status=1; echo "FAILED (FLEA_CUDA_NO_CUBLAS=1): $(basename "$t")" >> "$OUT/tests_mmvq.log"; }
  FLEA_CUDA_FUSE_OFF=mmvq_sa "$t" --nocapture --test-threads=1 ops_match_cpu every_type_matches_cpu \
    >> "$OUT/tests_mmvq.log" 2>&1 || { status=1; echo "FAILED (FLEA_CUDA_FUSE_OFF=mmvq_sa): $(basename "$t")" >> "$OUT/tests_mmvq.log"; }
  FLEA_CUDA_FUSE_OFF=mmvq_sa_rows "$t" --nocapture --test-threads=1 ops_match_cpu every_type_matches_cpu \
    >> "$OUT/tests_mmvq.log" 2>&1 || { status=1; echo "FAILED (FLEA_CUDA_FUSE_OFF=mmvq_sa_rows): $(basename "$t")" >> "$OUT/tests_mmvq.log"; }
  # Few-token matmuls of Q4_K / Q6_K without the tensor-core kernels (mmvq8_* up to 8 rows,
  # the cuBLAS GEMM above), as before them.
  FLEA_CUDA_NO_MMQ=1 "$t" --nocapture --test-threads=1 ops_match_cpu every_type_matches_cpu \
    >> "$OUT/tests_mmvq.log" 2>&1 || { status=1; echo "FAILED (FLEA_CUDA_NO_MMQ=1): $(basename "$t")" >> "$OUT/tests_mmvq.log"; }
  FLEA_CUDA_FUSE_OFF=mmvq_whole_row,mmvq_q6_steps "$t" --nocapture --test-threads=1 ops_match_cpu \
    every_type_matches_cpu whole_row >> "$OUT/tests_mmvq.log" 2>&1 || { status=1; echo "FAILED (FLEA_CUDA_FUSE_OFF=mmvq_whole_row,mmvq_q6_steps): $(basename "$t")" >> "$OUT/tests_mmvq.log"; }
  # Prompt attention one block per row, as without the tiled kernel.
  FLEA_CUDA_FUSE_OFF=attn_tiled "$t" --nocapture --test-threads=1 attention_matches_cpu architectures_match_cpu \
    >> "$OUT/tests_mmvq.log" 2>&1 || { status=1; echo "FAILED (FLEA_CUDA_FUSE_OFF=attn_tiled): $(basename "$t")" >> "$OUT/tests_mmvq.log"; }
done

# 2. Synthetic models for the benchmark, generated on this machine.
models=()
: > "$OUT/synth.log"
for p in $PRESETS; do
  f=/tmp/flea-bench-$p.gguf
  if [ ! -s "$f" ]; then
    "$CARRY/flea" synth --preset "$p" "$f" >> "$OUT/synth.log" 2>&1 || { status=1; continue; }
  fi
  models+=("$f")
done

# 3. Decode/prompt benchmark beside the memory roofline.
if [ ${#models[@]} -gt 0 ]; then
  "$CARRY/flea-cuda-bench" --tokens "$TOKENS" --prompt "$PROMPT" --json "$OUT/bench.json" \
    "${models[@]}" > "$OUT/bench.log" 2>&1 || status=1
fi

# 3b. `flea run` as users run it: decode chained on the GPU (greedy, sampled with the
# default top-k settings and a seed, and sampled from the whole vocabulary: --top-k 0, as
# OpenAI's parameters), beside the same with the host sampling (FLEA_CHAIN=0)
# and without CUDA graphs (FLEA_CUDA_GRAPH=0), alternating, RUNS times each after a
# discarded warm-up. Each line: the run's decode tok/s and its own efficiency against the
# device-memory floor; the texts of a variant pair must match.
# A run of model $f with prompt $text at --ctx ${ctx:-768}, its lines in run.log.
run_variant() {  # label, env assignments..., then -- and sampling flags
  local label=$1; shift
  local envs=()
  while [ "$1" != "--" ]; do envs+=("$1"); shift; done
  shift
  local o="$OUT/run_$(basename "$f" .gguf)_${label// /_}"
  env "${envs[@]}" "$CARRY/flea" run -m "$f" -p "$text" -n 64 "$@" --ignore-eos -t 16 \
    --ctx "${ctx:-768}" --device "${DEVICE:-cuda}" > "$o.txt" 2> "$o.err" || { status=1; echo "FAILED: $label" >> "$OUT/run.log"; }
  printf '%s %-28s %s %s %s\n' "$(basename "$f")" "$label" \
    "$(grep -o 'prompt: [0-9]* tokens in [0-9.]* s ([0-9.]* tok/s)' "$o.err" | tail -1)" \
    "$(grep -o 'decode: [0-9]* tokens in [0-9.]* s ([0-9.]* tok/s)' "$o.err" | tail -1)" \
    "$(grep -o 'decode efficiency [0-9.]*' "$o.err" | tail -1)" >> "$OUT/run.log"
}
words="the quick brown fox jumps over the lazy dog and"
text=$(for _ in $(seq 24); do printf '%s ' "$words"; done)
: > "$OUT/run.log"
if [ ${#models[@]} -gt 0 ]; then
  for f in "${models[@]}"; do
    run_variant "warm-up" FLEA_CHAIN=1 -- --temp 0
    for r in $(seq "${RUNS:-2}"); do
      run_variant "greedy chained $r" FLEA_CHAIN=1 -- --temp 0
      run_variant "greedy host $r" FLEA_CHAIN=0 -- --temp 0
      run_variant "greedy no graphs $r" FLEA_CHAIN=1 FLEA_CUDA_GRAPH=0 -- --temp 0
      run_variant "sampled chained $r" FLEA_CHAIN=1 -- --seed 5
      run_variant "sampled host $r" FLEA_CHAIN=0 -- --seed 5
      run_variant "vocab chained $r" FLEA_CHAIN=1 -- --seed 5 --top-k 0 --top-p 1
      run_variant "vocab host $r" FLEA_CHAIN=0 -- --seed 5 --top-k 0 --top-p 1
    done
    b="$OUT/run_$(basename "$f" .gguf)"
    for pair in "greedy_chained_1 greedy_host_1" "greedy_chained_1 greedy_no_graphs_1" \
                "sampled_chained_1 sampled_host_1" "vocab_chained_1 vocab_host_1"; do
      set -- $pair
      cmp -s "${b}_$1.txt" "${b}_$2.txt" || { status=1; echo "TEXT DIFFERS: $(basename "$f") $1 $2" >> "$OUT/run.log"; }
    done
    # 3c. Long contexts (1680- and 3990-token prompts: 1682-1745 and 3992-4055 keys while
    # decoding): the streaming decode attention (the default past 576 keys) beside the kernels
    # it replaced (FLEA_CUDA_ATTN_STREAM=off: 16-block clusters with V in registers to 2048
    # keys, then the split attention). The efficiency printed counts weight bytes only; the
    # K/V rows add 0.82 MB a key (13b). At 1680 tokens both paths add in the same order: the
    # texts must match. The 3990-token prompt also runs with its attention on the f32 kernels
    # (FLEA_CUDA_FUSE_OFF=attn_mma) beside the tensor-core ones: compare the prompt rates.
    for long in "80 2560" "190 6144"; do
      set -- $long
      text=$(for _ in $(seq "$1"); do printf '%s ' "$words"; done)
      ctx=$2
      for r in $(seq "${RUNS:-2}"); do
        run_variant "long $1 streaming $r" -- --temp 0
        run_variant "long $1 before $r" FLEA_CUDA_ATTN_STREAM=off -- --temp 0
        if [ "$1" = 190 ]; then
          run_variant "long $1 f32 prompt attention $r" FLEA_CUDA_FUSE_OFF=attn_mma -- --temp 0
        fi
      done
    done
    cmp -s "${b}_long_80_streaming_1.txt" "${b}_long_80_before_1.txt" || { status=1; echo "TEXT DIFFERS: $(basename "$f") long 80" >> "$OUT/run.log"; }
    text=$(for _ in $(seq 24); do printf '%s ' "$words"; done)
    ctx=768
  done
fi

# 3d. The real models' shapes with synthetic weights (SmolLM2-135M: Q4_1, tied output;
# Qwen2.5-0.5B: Q4_K_M with its Q5_0 / Q8_0 fallbacks for 896-wide rows): bound by their ~250
# launches a token, not by memory. Decode beside FLEA_CUDA_FUSE_OFF=q8_0 (act_q8_0 launches
# instead of Q8_0 outputs from the norms, attention and GLU): the same bits, so the same text.
if [ "${REAL_SHAPES:-1}" = 1 ]; then
  for spec in "smollm2-135m --quant q4_1 --tied" "qwen2.5-0.5b"; do
    set -- $spec
    f=/tmp/flea-bench-$1.gguf
    if [ ! -s "$f" ]; then
      "$CARRY/flea" synth --preset "$@" "$f" >> "$OUT/synth.log" 2>&1 || { status=1; continue; }
    fi
    ctx=768
    for r in $(seq "${RUNS:-2}"); do
      run_variant "greedy $r" -- --temp 0
      run_variant "greedy q8_0 off $r" FLEA_CUDA_FUSE_OFF=q8_0 -- --temp 0
    done
    b="$OUT/run_$(basename "$f" .gguf)"
    cmp -s "${b}_greedy_1.txt" "${b}_greedy_q8_0_off_1.txt" || { status=1; echo "TEXT DIFFERS: $(basename "$f") q8_0" >> "$OUT/run.log"; }
  done
fi

# 3e. Served batches (`flea serve` on the last preset, scripts/serve_batch_rate.py): 32
# clients, 128 tokens each, short prompts and ~860-token ones (FILLER 40), greedy; the
# default (a batch's decode attention in `attn_rows`) beside FLEA_CUDA_ATTN_ROWS=off (the
# split kernels). SERVE=0 skips it.
if [ "${SERVE:-1}" = 1 ] && [ ${#models[@]} -gt 0 ]; then
  f=${models[${#models[@]}-1]}
  : > "$OUT/serve.log"
  for rows in on off; do
    FLEA_CUDA_ATTN_ROWS=$rows "$CARRY/flea" serve -m "$f" --device "${DEVICE:-cuda}" --ctx 1536 \
      --parallel 64 -t 16 --port 8093 > "$OUT/serve_$rows.err" 2>&1 &
    pid=$!
    for filler in 0 40; do
      echo "$(basename "$f") attn_rows=$rows filler $filler: $(python3 "$(dirname "$0")/serve_batch_rate.py" \
        http://127.0.0.1:8093 32 128 $filler greedy 2>&1 | tail -1)" >> "$OUT/serve.log" || status=1
    done
    kill -TERM $pid; wait $pid || { status=1; echo "FAILED: serve attn_rows=$rows" >> "$OUT/serve.log"; }
  done
fi

# 4. Decode mat-vec GB/s per weight type, mmvq (1 and 2 rows per warp) vs matvec.
if [ -x "$CARRY/mmvq_bench" ]; then
  "$CARRY/mmvq_bench" 100 > "$OUT/mmvq_bench.log" 2>&1 || status=1
fi

{
  echo "exit status: $status"
  grep -h -E "^(PARITY|OP|SKIP|test |device:|  diag)|FAILED|panicked" "$OUT/tests.log"
  echo "--- scalar CPU reference"
  grep -h -E "^(PARITY|SKIP|test )|FAIL|ERROR|panicked|  diag" "$OUT/tests_scalar.log"
  echo "--- mmvq variants (FLEA_CUDA_MMVQ_ROWS=2, FLEA_CUDA_NO_CUBLAS=1)"
  grep -h -E "^(PARITY|OP|SKIP|test )|FAIL|ERROR|panicked|  diag" "$OUT/tests_mmvq.log"
  echo
  cat "$OUT/bench.log" 2>/dev/null
  echo "--- flea run decode (chained / host-sampled / without graphs)"
  cat "$OUT/run.log" 2>/dev/null
  echo "--- flea serve, 32 clients (attn_rows on / off)"
  cat "$OUT/serve.log" 2>/dev/null
  cat "$OUT/mmvq_bench.log" 2>/dev/null
} > "$OUT/summary.txt"
cat "$OUT/summary.txt"
exit $status
