"""``revision finetune``: stage 2, visual instruction tuning on real image embeddings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from revision import layout
from revision.config import FinetuneConfig, RossConfig, VoraConfig, blocks_of, describe, load_stage_config
from revision.encoder_identity import require_same_encoder
from revision.outputs import fingerprint, tree_digest
from revision.tracking import stage_run

if TYPE_CHECKING:  # imported where used: `revision --help` stays fast
    from revision.mllm import MLLM

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


def load_finetunable(pretrained: Path, cfg: FinetuneConfig, train_lm: bool = True) -> MLLM:
    """The stage-1 model with what stage 2 trains switched on: LoRA adapters or the whole LM (or, without
    ``train_lm``, the projector alone)."""
    from revision.mllm import add_lora, load_mllm

    model = load_mllm(pretrained)
    model.config.max_length = cfg.max_length
    if not train_lm:
        model.lm.requires_grad_(False)
    elif cfg.lora:
        add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    else:
        model.lm.requires_grad_(True)
    return model


def main(
    params: Path = typer.Option(Path("params.yaml"), help="params file holding the 'finetune' block"),
    prepared: Path = typer.Option(layout.PREPARED, help="manifests (sft.json)"),
    embeddings: Path = typer.Option(layout.EMBEDDINGS, help="embedding sets (sft_images)"),
    grids: Path = typer.Option(layout.GRID, help="grid features (sft_images) for a grid model"),
    pretrained: Path = typer.Option(layout.PRETRAIN, help="stage-1 MLLM from `revision pretrain`"),
    out: Path = typer.Option(layout.FINETUNE, help="output MLLM folder"),
    checkpoints: Path = typer.Option(layout.CHECKPOINTS / NAME, help="resumable training state"),
    metrics: Path = typer.Option(layout.stage_metrics(NAME), help="DVC metrics file"),
    loss_plot: Path = typer.Option(layout.loss_curve(NAME), help="per-step loss and lr (DVC plot)"),
) -> None:
    from accelerate.utils import set_seed

    from revision.grid import visual_set
    from revision.layout import SFT
    from revision.mllm import checkpoint_config
    from revision.ross import attach_ross
    from revision.train import StageOutputs, make_accelerator, train_and_save
    from revision.training_data import sft_samples

    cfg: FinetuneConfig = load_stage_config(NAME, params)
    ross_cfg: RossConfig | None = load_stage_config("ross", params) if cfg.ross else None
    accelerator = make_accelerator(cfg)
    set_seed(cfg.seed)
    pixels = checkpoint_config(pretrained).visual_input == "pixels"
    train_lm = load_stage_config("vora", params).finetune_lm if pixels else True
    model = load_finetunable(pretrained, cfg, train_lm)
    images = visual_set(embeddings, grids, layout.SFT_IMAGES.name, model.config)
    fix = "re-run pretrain on this encoder's embeddings"
    require_same_encoder(model.config.encoder, f"{pretrained} (trained)", images.encoder, images.dir, fix)
    samples = sft_samples(images, prepared, cfg.max_samples, cfg.seed)
    rebuild = lambda: load_finetunable(pretrained, cfg, train_lm)  # noqa: E731
    if ross_cfg:
        model = attach_ross(model, samples, ross_cfg, prepared / SFT.file, previous=pretrained)
        rebuild = lambda: model.like(load_finetunable(pretrained, cfg, train_lm))  # noqa: E731
    logged = blocks_of(params, NAME, *(["ross"] if cfg.ross else []))
    with stage_run(NAME, logged, accelerator.is_main_process) as run:
        ross = ross_cfg.model_dump() if ross_cfg else None
        run_id = fingerprint(cfg.model_dump(), ross, train_lm, tree_digest(pretrained), samples.digest())
        outputs = StageOutputs(out, metrics, loss_plot, checkpoints)
        summary = train_and_save(model, samples, cfg, accelerator, run, run_id, outputs, rebuild)
    typer.echo("finetune: " + json.dumps(summary))
