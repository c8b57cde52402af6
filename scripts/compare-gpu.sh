#!/usr/bin/env bash
# The forgetting experiment's full grid on one NVIDIA GPU (issue 15), for a machine without
# registry access, within one 10-minute call.
#
# Build here (no CUDA toolkit needed) and carry the binary:
#   CARGO_TARGET_DIR=target-cuda cargo build --release -p bapo-cli --features cuda
#   mkdir -p bin && cp target-cuda/release/bapo bin/bapo-cuda
#
# Usage: scripts/compare-gpu.sh BAPO_CUDA_BINARY MODEL_GGUF OUT_DIR [SEEDS] [JOBS]
#
# The grid: design A (six solo_<user> levels) and design B (five mixed levels) × every method
# (DPO over β, DPO + NLL, BAPO over λ, rehearsal) × SEEDS seeds (default 3), with
# configs/compare.toml's full budget. A 135M model leaves an H200 mostly idle, so JOBS (default
# 11: one per level) `bapo compare` processes share it, each with its own levels; every run
# lands in OUT_DIR/runs/<level>/<method>-seed<k>/result.json. A final `bapo compare
# --report-only` over every level writes the combined compare.{json,md}, the figures and the
# paired statistics. A run cut by the time limit (LIMIT, default 540 s) is redone by calling the
# script again (finished runs are skipped), so the grid can also be spread over several calls.
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
LIMIT=${LIMIT:-540}
t0=$(date +%s)
echo "compare-gpu $(date -u +%FT%TZ) seeds=$SEEDS jobs=$JOBS limit=${LIMIT}s" | tee -a "$OUT/compare-gpu.log"
running=0
for level in $LEVELS; do
  timeout "$LIMIT" "$BAPO" --backend cuda compare --config configs/compare.toml --out "$OUT" \
    --levels "$level" --seeds "$SEEDS" > "$OUT/$level.log" 2>&1 &
  running=$((running + 1))
  if [ "$running" -ge "$JOBS" ]; then
    wait -n
    running=$((running - 1))
  fi
done
wait
echo "grid: $(( $(date +%s) - t0 )) s; finished runs: $(find "$OUT/runs" -name result.json | wc -l)" | tee -a "$OUT/compare-gpu.log"
# Combine the finished runs into one report (a run cut by the limit is left out and named in
# the log; calling the script again trains it).
"$BAPO" --backend cuda compare --config configs/compare.toml --out "$OUT" --levels a,b \
  --seeds "$SEEDS" --report-only >> "$OUT/compare-gpu.log" 2>&1
echo "total: $(( $(date +%s) - t0 )) s" | tee -a "$OUT/compare-gpu.log"
