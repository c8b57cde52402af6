#!/usr/bin/env bash
# The forgetting experiment's full grid on one NVIDIA GPU (issue 15), for a machine without
# registry access, within one 10-minute call.
#
# Build here (no CUDA toolkit needed) and carry the binary:
#   CARGO_TARGET_DIR=target-cuda cargo build --release -p bapo-cli --features cuda
#   mkdir -p bin && cp target-cuda/release/bapo bin/bapo-cuda
#
# Usage: scripts/compare-gpu.sh BAPO_CUDA_BINARY MODEL_GGUF OUT_DIR [SEEDS] [JOBS]
#        DESIGN=a2 scripts/compare-gpu.sh ...   (design A′: near/far halves, 6 processes)
#
# The grid: design A (six solo_<user> levels) and design B (five mixed levels) × every method
# (DPO over β, DPO + NLL, BAPO over λ, rehearsal) × SEEDS seeds (default 3), with
# configs/compare.toml's full budget. A 135M model leaves an H200 mostly idle, so JOBS (default
# 11: one per level) `bapo compare` processes share it, each with its own levels; every run
# lands in OUT_DIR/runs/<level>/<method>-seed<k>/result.json.
#
# Seeds are the outer loop: round k trains seed k-1 of every level and method (`--seeds k`
# skips the runs of seeds already finished), so a call cut by its time limit (LIMIT, default
# 540 s in all) leaves whole seeds, balanced over levels and methods, not all seeds of some
# levels and none of others. A round starts only with at least ROUND_MIN seconds (default 120)
# left. A final `bapo compare --report-only` over every level writes the combined
# compare.{json,md}, the figures and the paired statistics. Calling the script again goes on
# where it stopped (finished runs are skipped), so the grid can be spread over several calls.
set -u
BAPO=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
MODEL=$(cd "$(dirname "$2")" && pwd)/$(basename "$2")
OUT=$(mkdir -p "$3" && cd "$3" && pwd)
SEEDS=${4:-3}
JOBS=${5:-11}
cd "$(dirname "$0")/.."
export BAPO_CACHE=$(dirname "$MODEL") RUST_LOG=${RUST_LOG:-info}
LEVELS="solo_concise solo_detailed solo_child solo_expert solo_friendly solo_formal \
one_user two_compatible two_opposing all_six all_six_no_profile"
REPORT=a,b
EXTRA=()
if [ "${DESIGN:-ab}" = a2 ]; then
  # Design A′ (docs/experiment.md): one process per user (its near and far halves), so each
  # user's pairs are scanned once; DPO and BAPO λ 1 at the CPU run's declared budget.
  LEVELS="near_concise,far_concise near_detailed,far_detailed near_child,far_child \
near_expert,far_expert near_friendly,far_friendly near_formal,far_formal"
  REPORT=a2
  source scripts/a2-budget.sh
  EXTRA=(--methods dpo,bapo_l1 "${A2_BUDGET[@]}")
fi
LIMIT=${LIMIT:-540}
t0=$(date +%s)
echo "compare-gpu $(date -u +%FT%TZ) seeds=$SEEDS jobs=$JOBS limit=${LIMIT}s" | tee -a "$OUT/compare-gpu.log"
ROUND_MIN=${ROUND_MIN:-120}
for k in $(seq 1 "$SEEDS"); do
  left=$(( LIMIT - ($(date +%s) - t0) ))
  if [ "$left" -lt "$ROUND_MIN" ]; then
    echo "seed round $k not started: ${left}s left" | tee -a "$OUT/compare-gpu.log"
    break
  fi
  echo "seed round $k (seed $((k - 1))): ${left}s left" | tee -a "$OUT/compare-gpu.log"
  running=0
  for level in $LEVELS; do
    timeout "$left" "$BAPO" --backend cuda compare --config configs/compare.toml --out "$OUT" \
      --levels "$level" --seeds "$k" "${EXTRA[@]}" >> "$OUT/${level%%,*}.log" 2>&1 &
    running=$((running + 1))
    if [ "$running" -ge "$JOBS" ]; then
      wait -n
      running=$((running - 1))
    fi
  done
  wait
done
echo "grid: $(( $(date +%s) - t0 )) s; finished runs: $(find "$OUT/runs" -name result.json | wc -l)" | tee -a "$OUT/compare-gpu.log"
# Combine the finished runs into one report (a run cut by the limit is left out and named in
# the log; calling the script again trains it).
"$BAPO" --backend cuda compare --config configs/compare.toml --out "$OUT" --levels "$REPORT" \
  --seeds "$SEEDS" --report-only "${EXTRA[@]}" >> "$OUT/compare-gpu.log" 2>&1
echo "total: $(( $(date +%s) - t0 )) s" | tee -a "$OUT/compare-gpu.log"
