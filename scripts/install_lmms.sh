#!/usr/bin/env bash
# The lmms extra on top of scripts/install.sh: lmms-eval in the project's .venv, so
# `python -m lmms_eval --model revision ...` scores this project's checkpoints (see README "lmms-eval").
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/pip install -q --disable-pip-version-check -e '.[test,lmms]'
# lmms-eval's math-task dependency (latex2sympy2) pins antlr4 4.7.2 over the 4.9 that DVC's Hydra parses
# `dvc exp run -S` overrides with; its math tasks are the only thing that needs 4.7, so 4.9 goes back.
.venv/bin/pip install -q --disable-pip-version-check --no-deps antlr4-python3-runtime==4.9.3
.venv/bin/python -c "import lmms_eval.models as m; assert 'revision' in m.list_available_models()"
