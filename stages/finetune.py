"""``revision finetune``: stage 2, visual instruction tuning on real image embeddings."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from revision import layout
from revision.config import FinetuneConfig, RossConfig, VoraConfig, describe
from revision.tracking import stage_run

NAME = "finetune"
HELP = (
    "Stage 2 (visual instruction tuning): real image embeddings and the SFT conversations (LLaVA JSON), loss "
    "on assistant turns only; the projector and the LM learn, through LoRA adapters (finetune.lora, merged "
    "on save) or fully. With finetune.ross, Ross's denoiser (stage 1's, when it trained one) reconstructs each "
    "image from the LM's states at the visual tokens. A pixels model (VoRA) trains its patch embedding, and its LM "
    "as above unless vora.finetune_lm is false.\n\nParams read (params.yaml):\n\n"
    + describe(FinetuneConfig, "finetune") + "\n\n" + describe(RossConfig, "ross") + "\n\nvora.finetune_lm: "
    + VoraConfig.model_fields["finetune_lm"].description
)


def main(
    params: Path = typer.Option(Path("params.yaml"), help="params file holding the 'finetune' block"),
    prepared: Path = typer.Option(layout.PREPARED, help="manifests (sft.json)"),
    embeddings: Path = typer.Option(layout.EMBEDDINGS, help="embedding sets (sft_images)"),
    visual: Path = typer.Option(layout.VISUAL, help="grid features or pixels (sft_images) for a grid or pixels model"),
    pretrained: Path = typer.Option(layout.PRETRAIN, help="stage-1 MLLM from `revision pretrain`"),
    out: Path = typer.Option(layout.FINETUNE, help="output MLLM folder"),
    checkpoints: Path = typer.Option(layout.CHECKPOINTS / NAME, help="resumable training state"),
    metrics: Path = typer.Option(layout.stage_metrics(NAME), help="DVC metrics file"),
    loss_plot: Path = typer.Option(layout.loss_curve(NAME), help="per-step loss and lr (DVC plot)"),
) -> None:
    from revision.train import StageOutputs, train_and_save
    from revision.training_setup import Inputs, finetune_setup

    setup = finetune_setup(params, Inputs(prepared, embeddings, visual=visual, pretrained=pretrained))
    with stage_run(NAME, setup.logged, setup.accelerator.is_main_process) as run:
        summary = train_and_save(setup, run, StageOutputs(out, metrics, loss_plot, checkpoints))
    typer.echo("finetune: " + json.dumps(summary))
