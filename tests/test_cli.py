"""The ``revision`` command starts without the heavy libraries: stage modules import them inside the
functions that run a stage, so ``revision --help`` (and each stage's ``--help``) loads none of them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from stages.cli import STAGES
from tests.helpers import ROOT

HEAVY = ("torch", "transformers", "accelerate", "open_clip", "pandas", "mlflow", "peft", "numpy")


def modules_loaded_by(code: str) -> set[str]:
    script = f"import sys, json\n{code}\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(json.loads(done.stdout.splitlines()[-1]))


@pytest.mark.parametrize("argv", [["revision", "--help"], ["revision", "pretrain", "--help"]])
def test_help_loads_no_heavy_library(argv):
    code = f"sys.argv = {argv!r}\nimport stages.cli\ntry:\n    stages.cli.app()\nexcept SystemExit:\n    pass"
    loaded = modules_loaded_by(code)
    assert not [name for name in HEAVY if name in loaded]


def test_every_stage_module_imports_light():
    loaded = modules_loaded_by("\n".join(f"import stages.{name}" for name in STAGES))
    assert not [name for name in HEAVY if name in loaded]
