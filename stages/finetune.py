"""``revision finetune``: stage 2, visual instruction tuning on real image embeddings."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from accelerate.utils import set_seed

from revision.config import FinetuneConfig, describe, load_stage_config, read_params
from revision.embeddings import EmbeddingSet
from revision.errors import InputError
from revision.mllm import MLLM, add_lora, load_mllm
from revision.outputs import fingerprint, tree_digest
from revision.recipes import make_accelerator, train_and_save
from revision.samples import sft_samples
from revision.tracking import stage_run

NAME = "finetune"
HELP = (
    "Stage 2 (visual instruction tuning): real image embeddings and the SFT conversations (LLaVA JSON), loss "
    "on assistant turns only; the projector and the LM learn, through LoRA adapters (finetune.lora, merged "
    "on save) or fully.\n\nParams read (params.yaml):\n\n" + describe(FinetuneConfig, "finetune")
)


def load_finetunable(pretrained: Path, cfg: FinetuneConfig) -> MLLM:
    """The stage-1 model with what stage 2 trains switched on: LoRA adapters or the whole LM."""
    model = load_mllm(pretrained)
    model.config.max_length = cfg.max_length
    if cfg.lora:
        add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    else:
        model.lm.requires_grad_(True)
    return model


def main(
    params: Path = typer.Option(Path("params.yaml"), help="params file holding the 'finetune' block"),
    prepared: Path = typer.Option(Path("data/prepared"), help="manifests (sft.json)"),
    embeddings: Path = typer.Option(Path("data/embeddings"), help="embedding sets (sft_images)"),
    pretrained: Path = typer.Option(Path("data/pretrain"), help="stage-1 MLLM from `revision pretrain`"),
    out: Path = typer.Option(Path("data/finetune"), help="output MLLM folder"),
    checkpoints: Path = typer.Option(Path("data/checkpoints/finetune"), help="resumable training state"),
    metrics: Path = typer.Option(Path("reports/finetune.json"), help="DVC metrics file"),
    loss_plot: Path = typer.Option(Path("reports/finetune_loss.csv"), help="per-step loss and lr (DVC plot)"),
) -> None:
    cfg: FinetuneConfig = load_stage_config(NAME, params)
    accelerator = make_accelerator(cfg)
    set_seed(cfg.seed)
    images = EmbeddingSet(embeddings / "sft_images")
    model = load_finetunable(pretrained, cfg)
    if model.config.encoder.get("id") != images.encoder.get("id"):
        raise InputError(
            f"{pretrained}: trained on encoder {model.config.encoder.get('id')}, but {images.dir} was made by "
            f"{images.encoder.get('id')}; re-run pretrain on this encoder's embeddings"
        )
    samples = sft_samples(images, prepared / "sft.json", cfg.max_samples, cfg.seed)
    with stage_run(NAME, read_params(params)[NAME], accelerator.is_main_process) as run:
        run_id = fingerprint(cfg.model_dump(), tree_digest(pretrained), samples.digest())
        outputs = (checkpoints, out, metrics, loss_plot, lambda: load_finetunable(pretrained, cfg))
        summary = train_and_save(model, samples, cfg, accelerator, run, run_id, *outputs)
    typer.echo("finetune: " + json.dumps(summary))
