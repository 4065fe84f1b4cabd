"""``revision pretrain``: stage 1, the projector learns to turn (aligned) text embeddings into visual tokens."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from revision import layout
from revision.config import ModelConfig, PretrainConfig, RossConfig, blocks_of, describe, load_stage_config
from revision.errors import InputError
from revision.outputs import fingerprint
from revision.tracking import stage_run

NAME = "pretrain"
HELP = (
    "Stage 1 (modality-substitution pretraining): the LM stays frozen and the projector learns to map one "
    "embedding to visual prefix tokens whose answer is the text the embedding came from. pretrain.source picks "
    "the input: aligned (ReVision), raw text embeddings, paired real images + captions, or none. With "
    "pretrain.ross (paired only) Ross's denoiser reconstructs each image from the LM's states at the visual tokens."
    "\n\nParams read (params.yaml):\n\n" + describe(PretrainConfig, "pretrain") + "\n\n"
    + describe(ModelConfig, "model") + "\n\n" + describe(RossConfig, "ross")
)


def main(
    params: Path = typer.Option(Path("params.yaml"), help="params file holding the 'pretrain' and 'model' blocks"),
    prepared: Path = typer.Option(layout.PREPARED, help="manifests (caption texts)"),
    embeddings: Path = typer.Option(layout.EMBEDDINGS, help="embedding sets (raw text, paired images)"),
    realign: Path = typer.Option(layout.REALIGN, help="realign output (aligned text)"),
    grids: Path = typer.Option(layout.GRID, help="grid features of the paired images (model.visual_input: grid)"),
    lm_dir: Path = typer.Option(layout.LM, help="LM from `revision lm`"),
    out: Path = typer.Option(layout.PRETRAIN, help="output MLLM folder"),
    checkpoints: Path = typer.Option(layout.CHECKPOINTS / NAME, help="resumable training state"),
    metrics: Path = typer.Option(layout.stage_metrics(NAME), help="DVC metrics file"),
    loss_plot: Path = typer.Option(layout.loss_curve(NAME), help="per-step loss and lr (DVC plot)"),
) -> None:
    from accelerate.utils import set_seed

    from revision.grid import check_grid
    from revision.layout import PRETRAIN_PAIRS
    from revision.mllm import freeze_lm, new_mllm
    from revision.ross import attach_ross
    from revision.train import StageOutputs, make_accelerator, train_and_save
    from revision.training_data import GRID_SOURCES, stage1_samples

    cfg: PretrainConfig = load_stage_config(NAME, params)
    model_cfg: ModelConfig = load_stage_config("model", params)
    ross_cfg: RossConfig | None = load_stage_config("ross", params) if cfg.ross else None
    if cfg.ross and cfg.source != "paired":
        raise InputError(f"{params}: pretrain.ross needs pretrain.source: paired; a {cfg.source!r} stage 1 has no "
                         f"image to reconstruct (add Ross in stage 2 with finetune.ross instead)")  # fmt: skip
    grid = model_cfg.visual_input == "grid"
    if grid and cfg.source not in GRID_SOURCES:
        raise InputError(f"{params}: model.visual_input: grid needs images in stage 1 (pretrain.source: paired or "
                         f"none); {cfg.source!r} text has pooled embeddings only")  # fmt: skip
    accelerator = make_accelerator(cfg)
    set_seed(model_cfg.seed)
    samples, vectors = stage1_samples(
        cfg.source, prepared, embeddings, realign, cfg.max_samples, cfg.seed, grids if grid else None
    )
    if grid:
        check_grid(vectors, model_cfg.grid)
    cell_dim = vectors.dim // vectors.tokens
    build = lambda: freeze_lm(new_mllm(lm_dir, model_cfg, vectors.encoder, cfg.max_length, cell_dim))  # noqa: E731
    model, rebuild = build(), build
    if cfg.ross:
        model = attach_ross(model, samples, ross_cfg, prepared / PRETRAIN_PAIRS.file)
        rebuild = lambda: model.like(build())  # noqa: E731
    logged = blocks_of(params, NAME, "model", *(["ross"] if cfg.ross else []))
    with stage_run(NAME, logged, accelerator.is_main_process) as run:
        ross = ross_cfg.model_dump() if ross_cfg else None
        run_id = fingerprint(cfg.model_dump(), model_cfg.model_dump(), ross, vectors.encoder, samples.digest() if samples else None)
        outputs = StageOutputs(out, metrics, loss_plot, checkpoints)
        summary = train_and_save(model, samples, cfg, accelerator, run, run_id, outputs, rebuild, {"source": cfg.source})
    typer.echo(f"pretrain ({cfg.source}): " + json.dumps(summary))
