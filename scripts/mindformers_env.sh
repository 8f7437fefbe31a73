#!/usr/bin/env bash
# Build (idempotent) the MindFormers environment that bench/mindformers_check.py and
# tests/test_train_mindformers.py use through MINDFORMERS_PYTHON:
#
#   bash scripts/mindformers_env.sh [DIR]        # DIR defaults to .venv-mf in the repository
#   MINDFORMERS_PYTHON=DIR/bin/python .venv/bin/python -m pytest -q tests/test_train_mindformers.py
#
# mindformers 2.1.0 pins mindspore~=2.11.0 and hyper-parallel~=1.0.0, neither on PyPI, so it is
# installed with --no-deps next to mindspore 2.10.0, and its own dependencies are listed here
# (docs/training.md, "MindFormers").  numpy<2 goes into the same pip command as everything else
# (mindspore 2.10 crashes with numpy 2), and pyarrow is held at 24 (pyarrow >= 25 needs numpy 2).
# A venv that already has exactly these pins (the stamp file) is left as it is.
set -euo pipefail
DIR="$(realpath -m "${1:-$(dirname "$0")/../.venv-mf}")"
PY="${PYTHON:-python3}"

MINDSPORE="mindspore==2.10.0"
MINDFORMERS="mindformers==2.1.0"
DEPS=("numpy<2" "pyarrow==24.*" "transformers>=5.3.0" "datasets>=5.0.1" "sentencepiece>=0.2.1" "ftfy>=6.1.1"
      regex tqdm pyyaml jieba rouge_chinese "mindpet==1.0.4" opencv-python-headless tokenizers astunparse
      tiktoken jinja2 setproctitle safetensors tensorboardX "deprecated>=1.2.0" pybind11 "setuptools>=83")
STAMP="$DIR/.mindyouzhi-mindformers-env"
WANT="$MINDSPORE $MINDFORMERS ${DEPS[*]}"

if [ -x "$DIR/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  echo "$DIR: MindFormers environment up to date"
  exit 0
fi
[ -x "$DIR/bin/python" ] || "$PY" -m venv "$DIR"
rm -f "$STAMP"
"$DIR/bin/python" -m pip install -q "$MINDSPORE" "${DEPS[@]}"
"$DIR/bin/python" -m pip install -q --no-deps "$MINDFORMERS"
# mindformers writes ./output/log on import: import it from a scratch directory.
SCRATCH="$(mktemp -d)"
trap 'rm -rf "$SCRATCH"' EXIT
(cd "$SCRATCH" && "$DIR/bin/python" -c "
import mindspore, mindformers, numpy
assert mindspore.__version__ == '2.10.0' and mindformers.__version__ == '2.1.0', (mindspore.__version__, mindformers.__version__)
assert int(numpy.__version__.split('.')[0]) < 2, numpy.__version__
") || { echo "$DIR: mindspore 2.10.0 / mindformers 2.1.0 / numpy<2 did not import" >&2; exit 1; }
echo "$WANT" > "$STAMP"
echo "$DIR: mindspore 2.10.0 + mindformers 2.1.0 ready ($DIR/bin/python)"
