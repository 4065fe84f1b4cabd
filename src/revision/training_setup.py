"""What each training stage trains, assembled from params: the objective around its MLLM, the samples, the
fingerprint a checkpoint may be resumed with and the params blocks to log. Combinations of params that cannot
work are refused here, in ``refuse_impossible``, before anything is built.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import set_seed

from revision import layout
from revision.checkpoints import checkpoint_config, load_mllm
from revision.config import FinetuneConfig, ModelConfig, PretrainConfig, TrainConfig, VoraConfig, blocks_of, load_stage_config
from revision.encoder_identity import require_same_encoder
from revision.errors import InputError
from revision.mllm import MLLM, add_lora, freeze_lm, new_mllm
from revision.objectives import LanguageModeling, Objective
from revision.outputs import fingerprint, tree_digest
from revision.precision import default_device, resolve
from revision.ross import attach_ross
from revision.training_data import EmbeddingConversations, sft_samples, stage1_samples, with_text_only
from revision.visual_input import TYPES, PixelsInput, from_params
from revision.vora import Vora, add_vision_lora


@dataclass
class TrainingSetup:
    stage: str  # pretrain | finetune
    cfg: TrainConfig
    accelerator: Accelerator
    objective: Objective
    samples: EmbeddingConversations | None  # None: nothing to train (pretrain.source: none), the model is saved as built
    run_id: str  # fingerprints params and inputs: a checkpoint made with another is never resumed
    logged: dict[str, object]  # the params blocks logged to MLflow
    extra: dict = field(default_factory=dict)  # more values for the stage's metrics


@dataclass(frozen=True)
class Inputs:
    """The folders the training stages read."""

    prepared: Path = layout.PREPARED
    embeddings: Path = layout.EMBEDDINGS
    realign: Path = layout.REALIGN
    visual: Path = layout.VISUAL
    lm: Path = layout.LM
    pretrained: Path = layout.PRETRAIN


def refuse_impossible(
    params: Path, visual_input: str, pretrain: PretrainConfig | None = None, finetune: FinetuneConfig | None = None
) -> None:
    """An ``InputError`` naming the params for a combination that cannot work."""
    if pretrain is not None and pretrain.ross and pretrain.source != "paired":
        raise InputError(f"{params}: pretrain.ross needs pretrain.source: paired; a {pretrain.source!r} stage 1 has no "
                         f"image to reconstruct (add Ross in stage 2 with finetune.ross instead)")
    if pretrain is not None and not TYPES[visual_input].text_stands_in and pretrain.source not in ("paired", "none"):
        raise InputError(f"{params}: model.visual_input: {visual_input} needs images in stage 1 (pretrain.source: "
                         f"paired or none); {pretrain.source!r} text has pooled embeddings only")
    ross = (pretrain is not None and pretrain.ross) or (finetune is not None and finetune.ross)
    if ross and visual_input == PixelsInput.kind:
        which = "pretrain.ross" if pretrain is not None else "finetune.ross"
        raise InputError(f"{params}: {which} is not available with model.visual_input: pixels (VoRA)")


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """An Accelerator at the stage's precision (``auto`` resolved for this process's device)."""
    precision = resolve(cfg.mixed_precision, default_device())
    return Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision=precision)


def pretrain_setup(params: Path, inputs: Inputs) -> TrainingSetup:
    """Stage 1: a new MLLM (LM frozen) on ``pretrain.source``'s samples, with Ross or VoRA's objective when on."""
    cfg: PretrainConfig = load_stage_config("pretrain", params)
    model_cfg: ModelConfig = load_stage_config("model", params)
    refuse_impossible(params, model_cfg.visual_input, pretrain=cfg)
    ross_cfg = load_stage_config("ross", params) if cfg.ross else None
    pixels = model_cfg.visual_input == PixelsInput.kind
    vora_cfg: VoraConfig | None = load_stage_config("vora", params) if pixels else None
    accelerator = make_accelerator(cfg)
    set_seed(model_cfg.seed)
    from_visual_stage = None if TYPES[model_cfg.visual_input].text_stands_in else inputs.visual
    samples, vectors = stage1_samples(
        cfg.source, inputs.prepared, inputs.embeddings, inputs.realign, cfg.max_samples, cfg.seed, from_visual_stage
    )
    visual = from_params(model_cfg, vora_cfg, vectors)
    if vora_cfg and vora_cfg.text_share and samples is not None:
        samples = with_text_only(samples, inputs.prepared, vora_cfg.text_share, cfg.seed)
    attention = vora_cfg.attention if vora_cfg else "causal"
    build = functools.partial(_stage1_mllm, inputs.lm, model_cfg, visual, vectors.encoder, cfg.max_length, attention,
                              vora_cfg if samples is not None else None)
    mllm = build()
    if cfg.ross:
        objective = attach_ross(mllm, build, samples, ross_cfg, inputs.prepared / layout.PRETRAIN_PAIRS.file)
    elif vora_cfg and samples is not None:
        objective = Vora(mllm, build, vora_cfg)
    else:
        objective = LanguageModeling(mllm, build)
    dumps = (cfg.model_dump(), model_cfg.model_dump(), ross_cfg.model_dump() if ross_cfg else None,
             vora_cfg.model_dump() if vora_cfg else None, vectors.encoder, samples.digest() if samples else None)
    logged = blocks_of(params, "pretrain", "model", *(["ross"] if cfg.ross else []), *(["vora"] if vora_cfg else []))
    return TrainingSetup("pretrain", cfg, accelerator, objective, samples, fingerprint(*dumps), logged, {"source": cfg.source})


def _stage1_mllm(lm: Path, model_cfg: ModelConfig, visual, encoder: dict, max_length: int, attention: str,
                 vora: VoraConfig | None) -> MLLM:
    """A new MLLM with its LM frozen; a VoRA model (``vora`` given) with its vision LoRA."""
    model = freeze_lm(new_mllm(lm, model_cfg, visual, encoder, max_length, attention))
    return add_vision_lora(model, vora) if vora is not None else model


def finetune_setup(params: Path, inputs: Inputs) -> TrainingSetup:
    """Stage 2: the stage-1 MLLM with LoRA (or its whole LM) on the SFT conversations, with Ross when on."""
    cfg: FinetuneConfig = load_stage_config("finetune", params)
    ross_cfg = load_stage_config("ross", params) if cfg.ross else None
    accelerator = make_accelerator(cfg)
    set_seed(cfg.seed)
    visual = checkpoint_config(inputs.pretrained).visual
    refuse_impossible(params, visual.kind, finetune=cfg)
    train_lm = load_stage_config("vora", params).finetune_lm if visual.kind == PixelsInput.kind else True
    build = functools.partial(load_finetunable, inputs.pretrained, cfg, train_lm)
    mllm = build()
    images = visual.rows(inputs.embeddings, inputs.visual, layout.SFT_IMAGES.name)
    fix = "re-run pretrain on this encoder's embeddings"
    require_same_encoder(mllm.config.encoder, f"{inputs.pretrained} (trained)", images.encoder, images.dir, fix)
    samples = sft_samples(images, inputs.prepared, cfg.max_samples, cfg.seed)
    if ross_cfg:
        sft = inputs.prepared / layout.SFT.file
        objective = attach_ross(mllm, build, samples, ross_cfg, sft, previous=inputs.pretrained)
    else:
        objective = LanguageModeling(mllm, build)
    ross = ross_cfg.model_dump() if ross_cfg else None
    run_id = fingerprint(cfg.model_dump(), ross, train_lm, tree_digest(inputs.pretrained), samples.digest())
    logged = blocks_of(params, "finetune", *(["ross"] if ross_cfg else []))
    return TrainingSetup("finetune", cfg, accelerator, objective, samples, run_id, logged)


def load_finetunable(pretrained: Path, cfg: FinetuneConfig, train_lm: bool = True) -> MLLM:
    """The stage-1 model with what stage 2 trains switched on: LoRA adapters or the whole LM (or, without
    ``train_lm``, the projector alone)."""
    model = load_mllm(pretrained)
    model.config.max_length = cfg.max_length
    if not train_lm:
        model.lm.requires_grad_(False)
    elif cfg.lora:
        add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    else:
        model.lm.requires_grad_(True)
    return model
