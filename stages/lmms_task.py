"""``revision lmms-task``: the eval split as an offline lmms-eval task group (revision_eval)."""

from __future__ import annotations

from pathlib import Path

import typer

from revision import layout

NAME = "lmms-task"
HELP = (
    "Write the held-out eval set that `revision evaluate` scores (the same seeded images, questions and ranked "
    "probes, from params.yaml's evaluate block) as lmms-eval tasks read from local files: revision_vqa (exact "
    "match), revision_pope (yes/no existence: accuracy, F1, yes-ratio) and revision_ranked (two-way multiple "
    "choice over log-likelihoods), grouped as revision_eval. Score a checkpoint with `python -m lmms_eval "
    "--model revision --model_args pretrained=data/finetune --include_path data/lmms_task --tasks revision_eval` "
    "(needs the lmms extra: `make lmms`). Not a DVC stage."
)


def main(
    params: Path = typer.Option(Path("params.yaml"), help="params file holding the 'evaluate' block"),
    prepared: Path = typer.Option(layout.PREPARED, help="manifests (eval.parquet) and images"),
    out: Path = typer.Option(Path("data/lmms_task"), help="task folder (replaced as a whole)"),
) -> None:
    from revision.config import load_stage_config
    from revision.lmms_task import GROUP, write_task

    counts = write_task(prepared, load_stage_config("evaluate", params), out)
    typer.echo(f"lmms-task: wrote {out} (group {GROUP}): " + ", ".join(f"{n} {name}" for name, n in counts.items()))
