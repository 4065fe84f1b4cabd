"""Typed stage configs, loaded from ``params.yaml``: the single source of truth for every value.

Each stage reads exactly one block (``prepare``, ``encoder``, ...). Unknown or wrongly typed keys are an
``InputError`` naming the file and the key, so a typo in ``dvc exp run -S`` never passes silently.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from revision.errors import InputError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SplitSizes(Strict):
    """Images per split for one bundled source. Splits are disjoint by construction."""

    encoder: int = Field(ge=0, description="paired image+caption rows that train the dual encoder")
    text: int = Field(ge=0, description="images whose captions form the unpaired text corpus (images dropped)")
    image_pool: int = Field(ge=0, description="unpaired images, captions dropped")
    pretrain: int = Field(ge=0, description="paired rows for the paired (LLaVA-style) baseline only")
    sft: int = Field(ge=0, description="images with instruction conversations")
    eval: int = Field(ge=0, description="held-out test images with reference captions and QAs")


class PrepareConfig(Strict):
    seed: int = Field(0, description="seeds the shuffles and the caption wording")
    sources: dict[Literal["easyvqa", "fashion_mnist"], SplitSizes] = Field(
        {}, description="bundled source -> images per split (encoder, text, image_pool, pretrain, sft, eval)"
    )
    captions_per_text_image: int = Field(1, ge=1, description="distinct captions drawn per text-corpus image")
    eval_captions: int = Field(5, ge=1, description="reference captions per eval image")
    user_dataset: str | None = Field(
        None, description="a ReVision dataset.json (unpaired 'images' and 'texts' lists) added to the pool and corpus"
    )
    user_llava: str | None = Field(None, description="a LLaVA JSON of image conversations added to SFT, pairs and eval")
    user_eval_fraction: float = Field(0.1, gt=0, lt=1, description="share of user_llava records held out for eval")
    user_pairs_fraction: float = Field(0.2, ge=0, lt=1, description="share of user_llava records used as captions pairs")


class LitConfig(Strict):
    """Locked-text dual encoder: frozen pretrained towers joined by trained projection heads."""

    text_tower: Literal["minilm", "tiny"] = "minilm"
    image_tower: Literal["efficientnet_lite0", "tiny"] = "efficientnet_lite0"
    image_size: int = Field(128, ge=16, description="image tower input resolution")
    embed_dim: int = Field(256, ge=2)
    epochs: int = Field(30, ge=0)
    batch_size: int = Field(256, ge=2)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)


class EncoderConfig(Strict):
    seed: int = 0
    kind: Literal["lit", "open_clip", "hf_clip"] = "lit"
    lit: LitConfig = LitConfig()
    open_clip_model: str = Field("ViT-B-32", description="open_clip architecture name (kind=open_clip)")
    checkpoint: str | None = Field(
        None, description="local .pt/.safetensors/local-dir: (open_clip) or a CLIP folder (hf_clip)"
    )
    trust_remote_code: bool = False
    batch_size: int = Field(64, ge=1, description="batch size for feature extraction")


class EmbedConfig(Strict):
    batch_size: int = Field(64, ge=1)
    shard_size: int = Field(4096, ge=1, description="rows per output shard file")


class RealignConfig(Strict):
    """Text -> image embedding alignment (ReAlign and the alternatives to compare it with)."""

    method: Literal["realign", "none", "mean_shift", "c3", "block_cov"] = Field(
        "realign",
        description="realign (the switches below) | none | mean_shift (Unicorn: subtract the text mean) | "
        "c3 (centre each modality, add noise) | block_cov (whiten text, colour with image covariance)",
    )
    anchor: bool = Field(True, description="(realign) move the text mean onto the image mean; off: keep the text mean")
    trace: bool = Field(
        True, description="(realign) scale the spread around the text mean by sqrt(trace_img / trace_txt), then normalize"
    )
    centroid: bool = Field(
        True, description="(realign) after normalizing, re-centre on the anchor target (fitted mu_hat), normalize again"
    )
    noise_std: float = Field(0.1, ge=0, description="(c3) std of the Gaussian noise added to each text coordinate")
    seed: int = Field(0, description="seeds the c3 noise and the gap report's subsamples")
    shrinkage: float = Field(
        0.1, ge=0, le=1, description="(block_cov) shrink both covariances toward a scaled identity by this share"
    )
    chunk_rows: int = Field(8192, ge=1, description="rows per streamed chunk; memory ~ chunk_rows x dim x 8 bytes x 4")
    report_sample: int = Field(2000, ge=10, description="rows per modality for the O(N^2) gap metrics and plots")
    report_k: int = Field(10, ge=1, description="neighbours for the kNN modality-mixing metric")
    probe_max_rows: int = Field(20000, ge=10, description="most rows per set for the logistic-regression probe")


S = TypeVar("S", bound=BaseModel)

STAGE_CONFIGS: dict[str, type[BaseModel]] = {
    "prepare": PrepareConfig,
    "encoder": EncoderConfig,
    "embed": EmbedConfig,
    "realign": RealignConfig,
}


def read_params(path: str | Path = "params.yaml") -> dict:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: params file not found (run from the repository root)")
    try:
        params = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise InputError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(params, dict):
        raise InputError(f"{path}: top level must be a mapping of stage blocks")
    return params


def load_stage_config(stage: str, path: str | Path = "params.yaml", model: type[S] | None = None) -> S:
    """Validate the ``stage`` block of ``path`` into its typed config."""
    model = model or STAGE_CONFIGS[stage]
    block = read_params(path).get(stage)
    if block is None:
        raise InputError(f"{path}: missing block '{stage}'")
    try:
        return model.model_validate(block)
    except ValidationError as err:
        problems = "; ".join(
            f"{stage}.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()
        )
        raise InputError(f"{path}: {problems}") from None


def describe(model: type[BaseModel], prefix: str) -> str:
    """A one-line-per-key summary of a config's params, for ``--help`` texts."""
    lines = []
    for name, field in model.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            lines.append(describe(sub, f"{prefix}.{name}"))
            continue
        desc = f": {field.description}" if field.description else ""
        lines.append(f"{prefix}.{name}{desc}")
    return "\n\n".join(lines)


def deep_merge(base: dict, overrides: dict) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "sources":
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def apply_profile(profile: str | Path, params: str | Path = "params.yaml") -> dict:
    """Merge a profile's overrides (e.g. ``profiles/tiny.yaml``) over ``params`` in place."""
    merged = deep_merge(read_params(params), read_params(profile))
    Path(params).write_text(yaml.safe_dump(merged, sort_keys=False))
    return merged
