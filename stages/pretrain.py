"""``revision pretrain``: stage 1, the projector learns to turn (aligned) text embeddings into visual tokens."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from revision import layout
from revision.config import ModelConfig, PretrainConfig, RossConfig, VoraConfig, blocks_of, describe, load_stage_config
from revision.errors import InputError
from revision.outputs import fingerprint
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
    grids: Path = typer.Option(layout.GRID, help="grid features or pixels of the paired images (model.visual_input: grid | pixels)"),
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
    from revision.patches import pixel_identity
    from revision.ross import attach_ross
    from revision.train import StageOutputs, make_accelerator, train_and_save
    from revision.training_data import GRID_SOURCES, stage1_samples, with_text_only
    from revision.vora import VoraMLLM, add_vision_lora

    cfg: PretrainConfig = load_stage_config(NAME, params)
    model_cfg: ModelConfig = load_stage_config("model", params)
    ross_cfg: RossConfig | None = load_stage_config("ross", params) if cfg.ross else None
    if cfg.ross and cfg.source != "paired":
        raise InputError(f"{params}: pretrain.ross needs pretrain.source: paired; a {cfg.source!r} stage 1 has no "
                         f"image to reconstruct (add Ross in stage 2 with finetune.ross instead)")  # fmt: skip
    kind = model_cfg.visual_input
    if kind != "pooled" and cfg.source not in GRID_SOURCES:
        raise InputError(f"{params}: model.visual_input: {kind} needs images in stage 1 (pretrain.source: paired or "
                         f"none); {cfg.source!r} text has pooled embeddings only")  # fmt: skip
    vora_cfg: VoraConfig | None = load_stage_config("vora", params) if kind == "pixels" else None
    if vora_cfg and cfg.ross:
        raise InputError(f"{params}: pretrain.ross is not available with model.visual_input: pixels (VoRA)")
    accelerator = make_accelerator(cfg)
    set_seed(model_cfg.seed)
    samples, vectors = stage1_samples(
        cfg.source, prepared, embeddings, realign, cfg.max_samples, cfg.seed, grids if kind != "pooled" else None
    )
    if kind == "grid":
        check_grid(vectors, model_cfg.grid)
    if vora_cfg and vectors.encoder != pixel_identity(vora_cfg.image_size):
        raise InputError(f"{vectors.dir}: holds {vectors.encoder.get('name')}, vora.image_size asks for "
                         f"{pixel_identity(vora_cfg.image_size)['name']}; re-run `revision grid`")  # fmt: skip
    if vora_cfg and vora_cfg.text_share and samples is not None:
        samples = with_text_only(samples, prepared, vora_cfg.text_share, cfg.seed)
    cell_dim = vectors.dim // vectors.tokens

    def build():
        model = freeze_lm(new_mllm(lm_dir, model_cfg, vectors.encoder, cfg.max_length, cell_dim, vora_cfg))
        return add_vision_lora(model, vora_cfg) if vora_cfg and samples is not None else model

    model, rebuild = build(), build
    if cfg.ross:
        model = attach_ross(model, samples, ross_cfg, prepared / PRETRAIN_PAIRS.file)
        rebuild = lambda: model.like(build())  # noqa: E731
    if vora_cfg and samples is not None:
        model = VoraMLLM(model, vora_cfg)
        rebuild = lambda: model.like(build())  # noqa: E731
    logged = blocks_of(params, NAME, "model", *(["ross"] if cfg.ross else []), *(["vora"] if vora_cfg else []))
    with stage_run(NAME, logged, accelerator.is_main_process) as run:
        ross = ross_cfg.model_dump() if ross_cfg else None
        vora = vora_cfg.model_dump() if vora_cfg else None
        digest = samples.digest() if samples else None
        run_id = fingerprint(cfg.model_dump(), model_cfg.model_dump(), ross, vora, vectors.encoder, digest)
        outputs = StageOutputs(out, metrics, loss_plot, checkpoints)
        summary = train_and_save(model, samples, cfg, accelerator, run, run_id, outputs, rebuild, {"source": cfg.source})
    typer.echo(f"pretrain ({cfg.source}): " + json.dumps(summary))
