"""Helpers shared by several test modules (fixtures stay in conftest.py, which builds on these).

Nothing here imports torch, transformers or the library at module level: conftest.py imports this module
before it switches the Hugging Face libraries offline, and a module being renamed in src/ should break only
the helper that uses it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
INSTRUMENT = Path(__file__).parent / "instrument"  # PYTHONPATH for subprocesses: see instrument/sitecustomize.py


# ---------------------------------------------------------------- subprocesses and repository copies


def run(
    cmd: list[str], cwd: Path, check: bool = True, tracking_uri: str = "sqlite:///mlflow.db", env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run a command with the venv's tools first on PATH; MLflow logs to ``cwd``'s store unless told otherwise."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "MLFLOW_TRACKING_URI": tracking_uri, **(env or {})}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def lock_outputs(repo: Path) -> dict[str, list]:
    """Every stage's outputs as DVC hashed them in dvc.lock."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    return {stage: sorted((o["path"], o.get("md5")) for o in entry.get("outs", [])) for stage, entry in lock.items()}


# Files an experiment rewrites in the workspace: `dvc exp run -S key=value` (and `dvc exp apply`) leave
# params.yaml holding the experiment's values, in DVC's own YAML spelling. Tests take them as committed.
EXPERIMENT_FILES = ("params.yaml",)


def committed_text(name: str, root: Path = ROOT) -> str:
    """``root / name`` as committed at HEAD, so that the experiment a user last ran or applied in the workspace
    never reaches a test; the file itself where ``root`` is no git checkout or HEAD does not hold it yet."""
    try:
        shown = subprocess.run(["git", "show", f"HEAD:./{name}"], cwd=root, capture_output=True, encoding="utf-8")
    except OSError:  # no git
        shown = None
    return shown.stdout if shown is not None and shown.returncode == 0 else (root / name).read_text(encoding="utf-8")


def committed_params(root: Path = ROOT) -> dict:
    """The committed params.yaml (see ``committed_text``), parsed."""
    return yaml.safe_load(committed_text("params.yaml", root))


def copy_repo(dest: Path, profile: str | None = "tiny", source: Path = ROOT) -> Path:
    """Tracked and untracked-not-ignored files of ``source`` into ``dest``, a fresh git repo with one commit.

    Code comes as it is in the working tree; the ``EXPERIMENT_FILES`` as committed (``committed_text``)."""
    files = run(["git", "ls-files", "-co", "--exclude-standard"], source).stdout.split()
    for name in files:
        src = source / name
        if src.is_file() and not name.startswith(("reports/", "data/")) and name != "dvc.lock":
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            if name in EXPERIMENT_FILES:
                (dest / name).write_text(committed_text(name, source), encoding="utf-8")
            else:
                shutil.copy2(src, dest / name)
    (dest / "data").mkdir(exist_ok=True)
    template = source / ".dvc" / "plots.html"  # what scripts/install.sh writes (git-ignored)
    if template.exists():
        shutil.copy2(template, dest / ".dvc" / "plots.html")
    else:
        run([sys.executable, "-m", "revision.offline_plots", str(dest / ".dvc" / "plots.html")], dest)
    if profile:
        run(["revision", "profile", profile], dest)
    run(["git", "init", "-q"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qm", "init"], dest)
    return dest


# ---------------------------------------------------------------- params files


def edit_params(source: Path, stage: str, dest: Path | None = None, /, **values) -> Path:
    """``source`` with ``values`` set in its ``stage`` block, written to ``dest`` (by default back to ``source``).

    Positional-only, so that any params key (pretrain.source, ...) can be set by name."""
    blocks = yaml.safe_load(Path(source).read_text())
    blocks[stage].update(values)
    dest = Path(source if dest is None else dest)
    dest.write_text(yaml.safe_dump(blocks))
    return dest


# ---------------------------------------------------------------- embeddings and models


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, in float64."""
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_embedding_set(
    directory: Path, ids: list[str], vectors: np.ndarray, encoder: dict, shard_size: int = 4096, batch: int | None = None
) -> Path:
    """An embedding set written through the real ``EmbeddingWriter``, ``batch`` rows per ``add`` (default: one call)."""
    from revision.embedding_sets import EmbeddingWriter

    vectors = np.asarray(vectors)
    writer = EmbeddingWriter(directory, encoder, vectors.shape[1], shard_size=shard_size)
    step = batch or max(len(ids), 1)
    for start in range(0, len(ids), step):
        writer.add(ids[start : start + step], vectors[start : start + step])
    writer.close()
    return Path(directory)


def tiny_mllm(lm_dir: Path, embed_dim: int, visual_tokens: int, encoder: dict, seed: int = 0):
    """An MLLM on the tiny LM in ``lm_dir`` (the ``tiny_lm_dir`` fixture) with a projector seeded by ``seed``."""
    import torch

    from revision.lm import load_lm
    from revision.mllm import MLLM, MLLMConfig
    from revision.visual_input import PooledInput

    lm, tokenizer = load_lm(lm_dir)
    torch.manual_seed(seed)
    return MLLM(lm, tokenizer, MLLMConfig(visual=PooledInput(embed_dim, visual_tokens), encoder=encoder))
