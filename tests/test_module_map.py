"""``revision.MODULES`` is the one map of the library: every module in src/revision/ has an entry and every entry a
module, so the map cannot drift from the files. ``revision.PLUMBING`` (what dvc.yaml leaves out of every stage's
deps, tests/test_dvc_deps.py) names modules of the map."""

from __future__ import annotations

import json
import subprocess
import sys

import revision
from tests.helpers import ROOT

SRC = ROOT / "src" / "revision"


def test_every_module_has_an_entry_and_every_entry_a_module():
    files = {path.stem for path in SRC.glob("*.py")} - {"__init__"}
    assert files, f"no modules in {SRC}"
    unmapped, gone = sorted(files - revision.MODULES.keys()), sorted(revision.MODULES.keys() - files)
    assert not unmapped, f"add these modules to revision.MODULES (src/revision/__init__.py): {unmapped}"
    assert not gone, f"revision.MODULES names modules with no file in src/revision/: {gone}"


def test_each_entry_is_one_line_saying_what_the_module_holds():
    bad = {name: text for name, text in revision.MODULES.items() if not isinstance(text, str) or not text.strip()
           or "\n" in text}
    assert not bad, bad


def test_plumbing_names_modules_of_the_map():
    assert revision.PLUMBING, "revision.PLUMBING is empty"
    assert len(set(revision.PLUMBING)) == len(revision.PLUMBING), revision.PLUMBING
    assert not set(revision.PLUMBING) - revision.MODULES.keys(), set(revision.PLUMBING) - revision.MODULES.keys()


def test_importing_the_package_imports_nothing_else():
    script = "import sys, json\nbefore = set(sys.modules)\nimport revision\nprint(json.dumps(sorted(set(sys.modules) - before)))"
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(done.stdout.splitlines()[-1]) == ["revision"]
