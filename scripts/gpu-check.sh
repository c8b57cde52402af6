#!/usr/bin/env bash
# The CUDA device check (issue 6), for a machine with an NVIDIA GPU and no registry access.
#
# Build here, with no CUDA toolkit needed (cubecl compiles kernels at run time):
#   CARGO_TARGET_DIR=target-cuda cargo build --release -p bapo-cli --features cuda
#   CARGO_TARGET_DIR=target-cuda cargo test  --release -p bapo-tests --features cuda --no-run
#   CARGO_TARGET_DIR=target-cuda cargo bench -p bapo-tests --features cuda --no-run
# and copy `bapo`, the `tiny_llama-*`, `smollm2-*` and `train_step-*` test executables and the
# `bapo-*` bench executable into BIN_DIR as bapo, tiny_llama, smollm2, train_step, bench.
#
# Usage: scripts/gpu-check.sh BIN_DIR MODEL_GGUF OUT_DIR
# Runs, each under its own time limit, appending everything to OUT_DIR/gpu-check.log:
#   1. nvidia-smi;
#   2. parity against the HF transformers fixtures on cuda: the tiny Llama and SmolLM2; then a
#      3-step BAPO training run (LoRA) on the tiny Llama whose loss curve must equal ndarray's;
#   3. the criterion benches on cuda (quick mode: 3 s per group): forward log-probs, one BAPO
#      training step (LoRA r 8, 4 pairs, 12 x 128 tokens), KV-cache generation (batch 1 and 8),
#      the objective and the chunked token KL, and the 2-peer all-reduce of LoRA r 8 gradients.
#      Criterion's reports go to OUT_DIR/criterion;
#   4. data-parallel wiring on one GPU: 3 steps of the tiny Llama on one device and on two
#      burn-collective peers sharing it (`--devices cuda:0,cuda:0`); dist.json and both adapters
#      land in OUT_DIR/dist-{one,two} (compare them as crates/bapo-cli/tests/dist.rs does).
set -u
BIN=$(cd "$1" && pwd); MODEL=$(cd "$(dirname "$2")" && pwd)/$(basename "$2"); OUT=$(mkdir -p "$3" && cd "$3" && pwd)
LOG=$OUT/gpu-check.log
cd "$(dirname "$0")/.."
export BAPO_CACHE=$(dirname "$MODEL") BAPO_FIXTURES=$PWD/tests/fixtures RUST_LOG=${RUST_LOG:-info}
stage() {
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s): $*" >> "$LOG"
  local t0=$(date +%s%N)
  timeout "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  echo "=== $name: exit $rc, $(( ($(date +%s%N) - t0) / 1000000 )) ms" >> "$LOG"
}
echo "gpu-check $(date -u +%FT%TZ) commit ${BAPO_COMMIT:-unknown}" >> "$LOG"
stage nvidia-smi 20 nvidia-smi
stage parity-tiny 90 "$BIN/tiny_llama" cuda --nocapture
stage parity-smollm2 120 "$BIN/smollm2" cuda --nocapture
stage train-parity 120 "$BIN/train_step" --nocapture
stage bench 240 env BAPO_BENCH_BACKEND=cuda BAPO_BENCH_QUICK=1 CRITERION_HOME="$OUT/criterion" \
  "$BIN/bench" --bench --warm-up-time 1
DIST_CFG=$OUT/dist.toml
sed -e "s#{model}#$PWD/tests/fixtures/tiny-llama#" -e "s#{data}#$PWD/data/demo/concise.jsonl#" > "$DIST_CFG" <<'EOF'
[model]
path = "{model}"
[data]
train = "{data}"
eval_fraction = 0.125
max_length = 96
[anchor]
max_new_tokens = 6
batch_size = 8
[lora]
rank = 4
alpha = 8.0
[train]
max_steps = 3
batch_size = 4
learning_rate = 1e-2
[output]
dir = "unused"
EOF
stage dist-one 120 "$BIN/bapo" --backend cuda train --config "$DIST_CFG" --output "$OUT/dist-one"
stage dist-two 120 "$BIN/bapo" train --config "$DIST_CFG" --output "$OUT/dist-two" --devices cuda:0,cuda:0
cat "$OUT/dist-two/dist.json" >> "$LOG" 2>/dev/null
grep -E "^=== |test result|worst token|time:|thrpt:|^cuda/|replicas_identical|time/sync_s" "$LOG" > "$OUT/gpu-check.summary" || true
