"""``revision export``: a checkpoint as a self-contained folder that needs no base LM."""

from __future__ import annotations

from pathlib import Path

import typer

from revision import layout
from revision.outputs import atomic_dir

NAME = "export"
HELP = (
    "Write a trained checkpoint (data/pretrain or data/finetune hold only what training changed: the projector "
    "and LoRA adapters, or a fully trained LM) as a self-contained folder: the whole LM with LoRA merged in "
    "(safetensors + tokenizer + chat template under lm/), the projector and mllm.json. `revision chat` and "
    "`revision evaluate` read it like any checkpoint. Not a DVC stage."
)


def main(
    checkpoint: Path = typer.Option(layout.FINETUNE, help="the checkpoint to export"),
    out: Path = typer.Option(..., help="output folder (replaced atomically)"),
) -> None:
    from revision.checkpoints import export_mllm

    with atomic_dir(out) as tmp:
        export_mllm(checkpoint, tmp)
    typer.echo(f"export: wrote {out} (self-contained) from {checkpoint}")
