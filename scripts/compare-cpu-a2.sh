#!/usr/bin/env bash
# Design A′ of the forgetting experiment (near and far halves of each user) on CPU, in pieces
# that each fit 45 minutes and each leave their results committed (issue 33).
#
# Usage: scripts/compare-cpu-a2.sh PIECE...
#   PIECE = METHOD:SEED:USER[,USER...], e.g. dpo:0:concise,detailed,child
#   trains near_<user> and far_<user> for each USER with METHOD at seed SEED (seeds below SEED
#   are trained first if missing; finished runs are always skipped), then writes the combined
#   report of every design-A′ run so far (`--report-only`) into docs/results/design-a2/
#   (compare.json, compare.md, the figures) and, with COMMIT=1, commits that folder alone.
#
# The budget (declared in docs/experiment.md before the first run): 16 training pairs per half
# drawn by the seed, every one trained once (8 steps of 2 pairs, learning rate 2e-3); every
# held-out prompt of the user answered (up to 96 tokens); knowledge on every capitals and
# general_knowledge item, chat format. A piece stops at LIMIT seconds (default 2700); a run it
# cut is trained again by the next call.
set -u
cd "$(dirname "$0")/.."
BAPO=${BAPO:-target/release/bapo}
OUT=${OUT:-runs/compare-cpu-a2}
RESULTS=docs/results/design-a2
LIMIT=${LIMIT:-2700}
source scripts/a2-budget.sh
ARGS=(--config configs/compare.toml --out "$OUT" "${A2_BUDGET[@]}")
export RUST_LOG=${RUST_LOG:-info}
ARCHIVE=$RESULTS/archive
# What the report reads from each finished run and its data (weights and optimizer state are
# not needed): archived in git after every piece and restored here first, so a fresh clone
# reports and skips every run that has landed.
KEEP=(result.json metrics.jsonl eval_base.json knowledge_items.json config.json
  reference_logps.cache.json anchors.jsonl train.jsonl test.jsonl gaps.json)
mkdir -p "$OUT" "$RESULTS"
[ -d "$ARCHIVE" ] && cp -rn "$ARCHIVE"/. "$OUT"/
# The reference's gap scan of each user (deterministic, published next to the results) is
# restored too, so a fresh clone does not score every pair again.
for g in "$RESULTS"/gaps-*.json; do
  [ -e "$g" ] || continue
  u=${g##*/gaps-}; u=${u%.json}
  [ -e "$OUT/data/scan/$u/gaps.json" ] || { mkdir -p "$OUT/data/scan/$u" && cp "$g" "$OUT/data/scan/$u/gaps.json"; }
done
archive() {
  local f rel
  for name in "${KEEP[@]}"; do
    find "$OUT/runs" "$OUT/data" -name "$name" 2>/dev/null
  done | while read -r f; do
    rel=${f#"$OUT"/}
    # A run counts once its result.json exists: skip the files of unfinished runs.
    case $rel in
      runs/*) [ -e "$(dirname "$f")/result.json" ] || continue ;;
      data/scan/*/run/*) continue ;;  # the scan's own run: gaps.json is all it leaves
    esac
    mkdir -p "$ARCHIVE/$(dirname "$rel")" && cp -p "$f" "$ARCHIVE/$rel"
  done
}
for piece in "$@"; do
  IFS=: read -r method seed users <<< "$piece"
  levels=$(echo "$users" | tr ',' '\n' | sed 's/.*/near_&,far_&/' | paste -sd, -)
  t0=$(date +%s)
  echo "piece $piece: levels $levels, started $(date -u +%FT%TZ)" | tee -a "$OUT/pieces.log"
  timeout "$LIMIT" "$BAPO" compare "${ARGS[@]}" --levels "$levels" --methods "$method" \
    --seeds $((seed + 1)) >> "$OUT/compare.log" 2>&1
  rc=$?
  echo "piece $piece: rc $rc after $(( $(date +%s) - t0 )) s; finished runs: $(find "$OUT/runs" -name result.json | wc -l)" \
    | tee -a "$OUT/pieces.log"
  methods=$(find "$OUT/runs" -name result.json 2>/dev/null | sed 's#.*/\([^/]*\)-seed[0-9]*/result.json#\1#' | sort -u | paste -sd, -)
  if [ -z "$methods" ]; then
    echo "piece $piece: no finished run to report (see $OUT/compare.log)"; exit 1
  fi
  "$BAPO" compare "${ARGS[@]}" --levels a2 --methods "$methods" --seeds 3 --report-only \
    >> "$OUT/compare.log" 2>&1 || { echo "report failed: see $OUT/compare.log"; exit 1; }
  archive
  cp "$OUT"/compare.json "$OUT"/compare.md "$RESULTS"/
  cp "$OUT"/heterogeneity.svg "$RESULTS"/ 2>/dev/null
  for g in "$OUT"/data/scan/*/gaps.json; do
    [ -e "$g" ] && cp "$g" "$RESULTS/gaps-$(basename "$(dirname "$g")").json"
  done
  if [ "${COMMIT:-0}" = 1 ]; then
    git add "$RESULTS" && git commit -q -m "design A′ results: piece $piece (rc $rc)" -- "$RESULTS" \
      && echo "committed piece $piece"
  fi
done
