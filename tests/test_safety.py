"""Safety properties read off the source: nothing unpickles untrusted files, no model code runs unless the
user turns trust_remote_code on, and the documented MLflow server listens on localhost only."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from revision import config
from revision.config import flatten, read_params
from tests.helpers import ROOT, committed_params

SCANNED = ("src", "stages", "benchmarks", "scripts")
PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill"}
# Named exceptions: functions that may import pickle to *write* pickles (dump only, never load), and why.
PICKLE_WRITERS = {
    ("benchmarks/bench_realign.py", "write_authors_pickle"):
        "writes the ReAlign authors' input format (pickled records) so that their embed_ReAlign.py can be timed",
}
PICKLE_WRITER_USES = {"imports pickle", "uses pickle.dump", "uses pickle.HIGHEST_PROTOCOL"}
LOCALHOST = "127.0.0.1"


# ---------------------------------------------------------------- the scanner


def _is_constant(node: ast.AST | None, value: bool) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


class UnsafeCode(ast.NodeVisitor):
    """Collects 'line: what' for each pickle use, unsafe torch.load, allow_pickle and literal trust_remote_code=True."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.torch_names = {"torch"}  # the names `torch` is imported as

    def flag(self, node: ast.AST, what: str) -> None:
        self.problems.append(f"{node.lineno}: {what}")

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name.split(".")[0] in PICKLE_MODULES:
                self.flag(node, f"imports {alias.name}")
            if alias.name == "torch":
                self.torch_names.add(alias.asname or "torch")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        if module.split(".")[0] in PICKLE_MODULES:
            self.flag(node, f"imports from {module}")
        if module == "torch" and any(alias.name == "load" for alias in node.names):
            self.flag(node, "imports torch.load by name (call torch.load(..., weights_only=True))")

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if isinstance(node.value, ast.Name) and node.value.id in PICKLE_MODULES:
            self.flag(node, f"uses {node.value.id}.{node.attr}")
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        keywords = {k.arg: k.value for k in node.keywords if k.arg}
        if "allow_pickle" in keywords and not _is_constant(keywords["allow_pickle"], False):
            self.flag(node, "allow_pickle is not False")
        if _is_constant(keywords.get("trust_remote_code"), True):
            self.flag(node, "trust_remote_code=True literal")
        if self._is_torch_load(node.func) and not _is_constant(keywords.get("weights_only"), True):
            self.flag(node, "torch.load without weights_only=True")
        self.generic_visit(node)

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        arguments = node.args
        positional = arguments.posonlyargs + arguments.args
        defaults = dict(zip(positional[len(positional) - len(arguments.defaults) :], arguments.defaults))
        defaults.update((a, d) for a, d in zip(arguments.kwonlyargs, arguments.kw_defaults) if d is not None)
        for argument, default in defaults.items():
            if argument.arg == "trust_remote_code" and not _is_constant(default, False):
                self.flag(node, f"{node.name}() defaults trust_remote_code to something other than False")
        self.generic_visit(node)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if isinstance(node.target, ast.Name) and node.target.id == "trust_remote_code" and _is_constant(node.value, True):
            self.flag(node, "trust_remote_code defaults to True")
        self.generic_visit(node)

    def _is_torch_load(self, func: ast.AST) -> bool:
        return (
            isinstance(func, ast.Attribute) and func.attr == "load"
            and isinstance(func.value, ast.Name) and func.value.id in self.torch_names
        )


def unsafe_code(source: str) -> list[str]:
    scanner = UnsafeCode()
    scanner.visit(ast.parse(source))
    return scanner.problems


def scanned_files() -> list[Path]:
    return sorted(path for folder in SCANNED for path in (ROOT / folder).rglob("*.py"))


BAD_SNIPPETS = [
    "import pickle",
    "import cloudpickle as cp",
    "from pickle import loads",
    "data = pickle.loads(blob)",
    "np.load(path, allow_pickle=True)",
    "torch.load(path)",
    "torch.load(path, map_location='cpu', weights_only=False)",
    "import torch as th\nth.load(path)",
    "from torch import load",
    "AutoModel.from_pretrained(path, trust_remote_code=True)",
    "def load_lm(path, trust_remote_code=True):\n    pass",
    "def load_lm(path, *, trust_remote_code=None):\n    pass",
    "class Cfg(BaseModel):\n    trust_remote_code: bool = True",
]
SAFE_SNIPPETS = [
    "torch.load(path, weights_only=True)",
    "np.load(path)",
    "np.load(path, allow_pickle=False)",
    "AutoModel.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)",
    "def load_lm(path, trust_remote_code: bool = False):\n    pass",
    "# import pickle; torch.load(path)",
    "text = 'torch.load(path) with trust_remote_code=True'",
    "state = safetensors.torch.load_file(path)",
]


@pytest.mark.parametrize("snippet", BAD_SNIPPETS)
def test_the_scanner_finds_each_unsafe_construct(snippet):
    assert len(unsafe_code(snippet)) == 1, snippet


@pytest.mark.parametrize("snippet", SAFE_SNIPPETS)
def test_the_scanner_passes_safe_code(snippet):
    assert unsafe_code(snippet) == []


def pickle_writer_lines(relative: str, source: str) -> set[int]:
    """Lines of the functions in ``PICKLE_WRITERS`` for this file."""
    names = {name for file, name in PICKLE_WRITERS if file == relative}
    return {line for node in ast.walk(ast.parse(source)) if isinstance(node, ast.FunctionDef) and node.name in names
            for line in range(node.lineno, node.end_lineno + 1)}


def allowed(relative: str, source: str, problem: str) -> bool:
    line, what = problem.split(": ", 1)
    return what in PICKLE_WRITER_USES and int(line) in pickle_writer_lines(relative, source)


def test_no_unsafe_deserialization_or_remote_code_in_the_code_base():
    files = scanned_files()
    assert ROOT / "src" / "revision" / "encoders.py" in files  # it holds the one torch.load
    problems = []
    for path in files:
        relative, source = path.relative_to(ROOT).as_posix(), path.read_text()
        problems += [f"{relative}:{p}" for p in unsafe_code(source) if not allowed(relative, source, p)]
    assert problems == []


def test_each_pickle_writer_exception_names_an_existing_function():
    for file, name in PICKLE_WRITERS:
        assert pickle_writer_lines(file, (ROOT / file).read_text()), f"{file}: no function {name}(); drop its exception"


def test_a_pickle_writer_exception_allows_dump_but_not_load():
    source = "def write_authors_pickle():\n    import pickle\n    pickle.dump(1, f)\n    pickle.load(f)\n"
    kept = [p for p in unsafe_code(source) if not allowed("benchmarks/bench_realign.py", source, p)]
    assert kept == ["4: uses pickle.load"]


# ---------------------------------------------------------------- trust_remote_code stays off


def config_models() -> list[type[BaseModel]]:
    return [
        model for _, model in inspect.getmembers(config, inspect.isclass)
        if issubclass(model, BaseModel) and model.__module__ == config.__name__
    ]


def test_every_trust_remote_code_param_is_explicit_and_off_in_params():
    owners = {model.__name__: model.model_fields["trust_remote_code"] for model in config_models()
              if "trust_remote_code" in model.model_fields}
    assert {"EncoderConfig", "ModelConfig"} <= set(owners)
    assert all(field.is_required() for field in owners.values())  # no silent default: params.yaml must say it
    shipped = flatten(committed_params())
    assert {"encoder.trust_remote_code", "model.trust_remote_code"} <= set(shipped)
    assert shipped["encoder.trust_remote_code"] is False and shipped["model.trust_remote_code"] is False


def test_shipped_params_and_profiles_keep_trust_remote_code_off():
    shipped = {ROOT / "params.yaml": committed_params()} | {path: read_params(path) for path in sorted((ROOT / "profiles").glob("*.yaml"))}
    for path, params in shipped.items():
        settings = {key: value for key, value in flatten(params).items() if key.endswith("trust_remote_code")}
        assert all(value is False for value in settings.values()), (path, settings)


# ---------------------------------------------------------------- MLflow stays on localhost


def mlflow_commands(markdown: str) -> list[str]:
    """Every `mlflow ui` / `mlflow server` command line in ``markdown``, continuation lines joined."""
    text = markdown.replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if re.search(r"\bmlflow\s+(ui|server)\b", line)]


def exposed(command: str) -> bool:
    """True unless the command binds explicitly to localhost and nowhere else."""
    hosts = re.findall(r"(?:--host|-h)[=\s]+(\S+)", command)
    return hosts != [LOCALHOST] or "0.0.0.0" in command


def test_the_localhost_check_catches_an_exposed_server():
    sample = "mlflow ui --port 5000\nmlflow server \\\n  --host 0.0.0.0\nmlflow ui --host 127.0.0.1\n"
    assert [exposed(command) for command in mlflow_commands(sample)] == [True, True, False]


def test_readme_mlflow_server_binds_to_localhost():
    commands = mlflow_commands((ROOT / "README.md").read_text())
    assert commands, "README.md documents no mlflow ui/server command"
    assert [command for command in commands if exposed(command)] == []
