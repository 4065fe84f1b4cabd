"""``revision pretrain``: stage 1, the projector learns to turn (aligned) text embeddings into visual tokens."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from revision import layout
from revision.config import ModelConfig, PretrainConfig, RossConfig, VoraConfig, describe
from revision.tracking import stage_run

NAME = "pretrain"
HELP = (
    "Stage 1 (modality-substitution pretraining): the LM stays frozen and the projector learns to map one "
    "embedding to visual prefix tokens whose answer is the text the embedding came from. pretrain.source picks "
    "the input: aligned (ReVision), raw text embeddings, paired real images + captions, or none. With "
    "pretrain.ross (paired only) Ross's denoiser reconstructs each image from the LM's states at the visual tokens. "
    "With model.visual_input: pixels (VoRA) the image patches enter the LM, whose vision LoRA learns with the "
    "projector (the patch embedding), distilled from the vora teacher's blocks; vora.text_share mixes in text-only "
    "samples (LM loss only)."
    "\n\nParams read (params.yaml):\n\n" + describe(PretrainConfig, "pretrain") + "\n\n"
    + describe(ModelConfig, "model") + "\n\n" + describe(RossConfig, "ross") + "\n\n" + describe(VoraConfig, "vora")
)


def main(
    params: Path = typer.Option(Path("params.yaml"), help="params file holding the 'pretrain' and 'model' blocks"),
    prepared: Path = typer.Option(layout.PREPARED, help="manifests (caption texts)"),
    embeddings: Path = typer.Option(layout.EMBEDDINGS, help="embedding sets (raw text, paired images)"),
    realign: Path = typer.Option(layout.REALIGN, help="realign output (aligned text)"),
    visual: Path = typer.Option(layout.VISUAL, help="grid features or pixels of the paired images (model.visual_input: grid | pixels)"),
    lm_dir: Path = typer.Option(layout.LM, help="LM from `revision lm`"),
    out: Path = typer.Option(layout.PRETRAIN, help="output MLLM folder"),
    checkpoints: Path = typer.Option(layout.CHECKPOINTS / NAME, help="resumable training state"),
    metrics: Path = typer.Option(layout.stage_metrics(NAME), help="DVC metrics file"),
    loss_plot: Path = typer.Option(layout.loss_curve(NAME), help="per-step loss and lr (DVC plot)"),
) -> None:
    from revision.train import StageOutputs, train_and_save
    from revision.training_setup import Inputs, pretrain_setup

    setup = pretrain_setup(params, Inputs(prepared, embeddings, realign, visual, lm_dir))
    with stage_run(NAME, setup.logged, setup.accelerator.is_main_process) as run:
        summary = train_and_save(setup, run, StageOutputs(out, metrics, loss_plot, checkpoints))
    typer.echo(f"pretrain ({setup.extra['source']}): " + json.dumps(summary))
