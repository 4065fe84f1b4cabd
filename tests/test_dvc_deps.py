"""dvc.yaml's code deps are what each stage's command imports: edit a module and DVC re-runs exactly the stages
that run it.

For every stage whose cmd is `revision <name>` (or `${launch} <name>`), the expected .py deps are the project
files stages/<name>.py reaches through its imports (read with ast, imports inside functions included), less the
plumbing modules ``revision.PLUMBING`` names (the package's module map, ``revision.MODULES``).
Not followed: imports made by name at run time (importlib), and stages/cli.py, which starts every stage.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

import revision
from tests.helpers import ROOT, committed_params

PACKAGES = {"revision": ROOT / "src" / "revision", "stages": ROOT / "stages"}  # the project's importable code
STAGE_COMMAND = re.compile(r"(?:^|\s)(?:revision|-m stages)\s+([\w-]+)")


def module_file(name: str) -> Path | None:
    """The file of project module ``name`` (``revision.gap`` -> src/revision/gap.py); None outside the project."""
    top, *rest = name.split(".")
    if top not in PACKAGES:
        return None
    path = PACKAGES[top].joinpath(*rest)
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def imported_files(path: Path) -> set[Path]:
    """The project files ``path`` imports, anywhere in it: ``import m``, ``from m import x`` (x's file where x is
    a module of package m, else m's). A package's __init__.py counts only where it is imported by name."""
    root = ROOT / "src" if path.is_relative_to(ROOT / "src") else ROOT
    package = path.relative_to(root).parent.parts
    files: set[Path | None] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            files.update(module_file(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the file's own package, or one above per extra dot
                base = ".".join([*package[: len(package) - node.level + 1], *([base] if base else [])])
            for alias in node.names:
                submodule = module_file(f"{base}.{alias.name}")
                files.add(submodule if submodule is not None and submodule.is_file() else module_file(base))
    return files - {None}


def import_closure(start: Path) -> set[Path]:
    """``start`` and every project file it reaches through imports (a module that is not there is kept, so that
    the comparison names it, but not followed)."""
    seen, todo = set(), [start]
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo.extend(imported_files(path) if path.is_file() else ())
    return seen


def relative(paths: set[Path]) -> set[str]:
    return {path.relative_to(ROOT).as_posix() for path in paths}


def plumbing() -> set[str]:
    """The files of the modules ``revision.PLUMBING`` names, as dvc.yaml spells paths."""
    return {f"src/revision/{name}.py" for name in revision.PLUMBING}


def code_stages() -> dict[str, dict]:
    """Each dvc.yaml stage that runs a `revision` subcommand: its stage module and its .py deps."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    launch = committed_params()["launch"]  # not whatever `dvc exp run -S launch=...` last left in the workspace
    found = {}
    for stage, entry in stages.items():
        match = STAGE_COMMAND.search(entry["cmd"].replace("${launch}", launch))
        if match:
            deps = {dep for dep in entry.get("deps", []) if dep.endswith(".py")}
            found[stage] = {"module": ROOT / "stages" / f"{match.group(1)}.py", "deps": deps}
    return found


def expected_deps() -> dict[str, set[str]]:
    """What each code stage's deps should be: its command's import closure, less plumbing."""
    skip = plumbing()
    return {stage: relative(import_closure(info["module"])) - skip for stage, info in code_stages().items()}


def test_every_stage_lists_exactly_the_modules_its_command_imports():
    stages = code_stages()
    assert {"prepare", "encoder", "embed", "realign", "lm", "pretrain", "finetune", "evaluate"} <= set(stages)
    expected = expected_deps()
    problems = []
    for stage, info in stages.items():
        assert info["module"].is_file(), f"{stage}: its command's module {info['module']} does not exist"
        missing, extra = sorted(expected[stage] - info["deps"]), sorted(info["deps"] - expected[stage])
        if missing or extra:
            problems.append(f"{stage}: missing {missing}, not imported (or plumbing) {extra}")
    assert not problems, "dvc.yaml deps differ from what the stages import:\n" + "\n".join(problems)


def test_plumbing_files_exist():
    files = plumbing()
    assert files, "revision.PLUMBING is empty"
    missing = [path for path in sorted(files) if not (ROOT / path).is_file()]
    assert not missing, f"revision.PLUMBING names modules that do not exist: {missing}"


def test_the_closure_follows_every_kind_of_import(tmp_path, monkeypatch):
    """A throwaway project: absolute, from-package, from-module, relative, nested and in-function imports all
    count; third-party modules and names imported from a module do not."""
    src, stages = tmp_path / "src" / "revision", tmp_path / "stages"
    src.mkdir(parents=True)
    stages.mkdir()
    files = {
        stages / "demo.py": "import json\nimport revision.a\nfrom revision import b\nfrom stages.shared import helper\n"
                            "def main():\n    from revision.c import value\n",
        stages / "shared.py": "from revision.d import thing\n\ndef helper():\n    pass\n",
        src / "a.py": "import numpy\n",
        src / "b.py": "from revision.e import *\n",
        src / "c.py": "from .f import value\n",
        src / "d.py": "thing = 2\n",
        src / "e.py": "",
        src / "f.py": "value = 1\n",
        src / "unused.py": "",
        src / "__init__.py": "",
    }
    for path, text in files.items():
        path.write_text(text)
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    monkeypatch.setitem(PACKAGES, "revision", src)
    monkeypatch.setitem(PACKAGES, "stages", stages)
    closure = relative(import_closure(stages / "demo.py"))
    assert closure == {"stages/demo.py", "stages/shared.py"} | {f"src/revision/{m}.py" for m in "abcdef"}
