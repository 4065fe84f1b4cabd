"""What the MLLM reads of an image: one of three visual-input types, each knowing its geometry.

- ``PooledInput``: one joint-space embedding per image (ReVision), mapped by an MLP to ``tokens`` prefix
  vectors. Its rows are the embed stage's (or realign's aligned text, standing in for images).
- ``GridInput``: the image tower's last feature map pooled to ``side`` x ``side`` cells (LLaVA), one token per
  cell through a shared MLP. Its rows (cells flattened) are the visual stage's.
- ``PixelsInput``: the image itself at ``image_size`` pixels (VoRA), cut into ``patch``-pixel patches by a patch
  embedding, one token per patch. Its rows (pixels flattened) are the visual stage's.

A type's ``fields`` are what a checkpoint's mllm.json records of it, so loading never re-derives a geometry.
A new type is a class here, its name in ``TYPES`` and in ``ModelConfig.visual_input``.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import nn

from revision.embedding_sets import EmbeddingSet
from revision.errors import InputError

CHANNELS = 3  # a pixels row is RGB


class Projector(nn.Module):
    """One embedding (dim d) -> ``visual_tokens`` x ``hidden_size`` prefix vectors."""

    def __init__(self, embed_dim: int, hidden_size: int, visual_tokens: int):
        super().__init__()
        self.visual_tokens, self.hidden_size = visual_tokens, hidden_size
        # Unit-norm embeddings have components ~1/sqrt(d); rescaling gives the first layer unit-variance inputs.
        self.input_scale = math.sqrt(embed_dim)
        self.mlp = nn.Sequential(
            nn.Linear(embed_dim, hidden_size), nn.GELU(), nn.Linear(hidden_size, visual_tokens * hidden_size)
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        prefix = self.mlp(embeddings * self.input_scale)
        return prefix.view(embeddings.shape[0], self.visual_tokens, self.hidden_size)


class GridProjector(nn.Module):
    """Grid features (``visual_tokens`` cells of dim d, flattened in one row) -> one prefix vector per cell,
    each through the same 2-layer GELU MLP (LLaVA-1.5's projector). The cells are raw tower features, so a
    LayerNorm without parameters gives the MLP unit-scale inputs."""

    def __init__(self, embed_dim: int, hidden_size: int, visual_tokens: int):
        super().__init__()
        self.visual_tokens, self.hidden_size, self.embed_dim = visual_tokens, hidden_size, embed_dim
        self.norm = nn.LayerNorm(embed_dim, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(embed_dim, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        cells = features.view(features.shape[0], self.visual_tokens, self.embed_dim)
        return self.mlp(self.norm(cells))


class PatchEmbedding(nn.Module):
    """Rows of pixels [B, 3 · S²] -> [B, (S / patch)², hidden_size] image tokens: the VoRA authors' design, a
    convolution with kernel = stride = ``patch``, RMSNorm, a learned position per patch, and a bias-free linear
    map into the LM's width; one token per patch, row-major."""

    def __init__(self, image_size: int, patch: int, hidden_size: int):
        super().__init__()
        self.image_size, self.patch, self.hidden_size = image_size, patch, hidden_size
        self.visual_tokens = (image_size // patch) ** 2
        self.conv = nn.Conv2d(CHANNELS, hidden_size, patch, stride=patch)
        self.norm = nn.RMSNorm(hidden_size, eps=1e-6)
        self.positions = nn.Parameter(torch.randn(self.visual_tokens, hidden_size) * 0.02)
        self.out = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        images = pixels.view(-1, CHANNELS, self.image_size, self.image_size)
        patches = self.conv(images).flatten(2).transpose(1, 2)
        return self.out(self.norm(patches) + self.positions)


def pixel_identity(image_size: int) -> dict:
    """What stands where an encoder's identity stands for pixel rows: the preprocessing that made them."""
    name = f"pixels-{image_size}"
    return {"kind": "pixels", "name": name, "dim": CHANNELS * image_size**2, "id": hashlib.sha256(name.encode()).hexdigest()[:16]}


class PixelRows(nn.Module):
    """``encode_images`` -> [B, 3 · image_size²]: images resized to ``image_size`` a side, RGB (grey images get
    three equal channels), scaled to [-1, 1] and flattened, so they travel in the embedding-set format."""

    tokens = 1

    def __init__(self, image_size: int):
        super().__init__()
        self.image_size, self.dim = image_size, CHANNELS * image_size**2

    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        from revision.encoders import pixel_tensor

        return pixel_tensor(images, self.image_size).flatten(1)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        raise InputError("text has no pixels: only images can be a pixels model's visual input")


def _load_checked_encoder(encoder_dir: Path, trained_on: dict, where: str, fix: str, device) -> nn.Module:
    from revision.encoder_identity import require_same_encoder
    from revision.encoders import load_encoder

    encoder, identity = load_encoder(encoder_dir)
    require_same_encoder(trained_on, where, identity, encoder_dir, fix)
    return encoder.to(device)


def _visual_rows(visual: Path, name: str, kind: str, what: str) -> EmbeddingSet:
    """The visual stage's set ``name``: ``what`` (e.g. "grid features") a ``kind`` model reads."""
    if not (visual / name / "index.json").is_file():
        raise InputError(f"{visual / name}: no {what} for a {kind} model; set model.visual_input: {kind} and run "
                         f"`revision visual`")
    return EmbeddingSet(visual / name)


def _geometry(fields: dict[str, Any], name: str) -> int:
    if name not in fields:
        raise InputError(f"mllm.json: a {fields['visual_input']} model without its {name!r} (written by an older "
                         f"version: re-run the training stages)")
    return fields[name]


@dataclass(frozen=True)
class PooledInput:
    """One pooled embedding of ``dim`` values per image -> ``tokens`` prefix vectors."""

    dim: int
    tokens: int
    kind: ClassVar[str] = "pooled"
    text_stands_in: ClassVar[bool] = True  # stage 1 may read text embeddings (aligned or raw) in place of images

    @property
    def side(self) -> int | None:
        """The tokens as a square map, where they form one (objectives that read a token map need it)."""
        side = math.isqrt(self.tokens)
        return side if side * side == self.tokens else None

    @property
    def fields(self) -> dict[str, Any]:
        return {"embed_dim": self.dim, "visual_tokens": self.tokens, "visual_input": self.kind}

    def projector(self, hidden_size: int) -> nn.Module:
        return Projector(self.dim, hidden_size, self.tokens)

    def rows(self, embeddings: Path, visual: Path, name: str) -> EmbeddingSet:
        return EmbeddingSet(embeddings / name)

    def reader(self, encoder_dir: Path, trained_on: dict, where: str, fix: str, device="cpu") -> nn.Module:
        return _load_checked_encoder(encoder_dir, trained_on, where, fix, device)

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> PooledInput:
        return cls(fields["embed_dim"], fields["visual_tokens"])

    @classmethod
    def from_params(cls, model: Any, vora: Any, rows: EmbeddingSet) -> PooledInput:
        return cls(rows.encoder["dim"], model.visual_tokens)

    @classmethod
    def for_visual_stage(cls, model: Any, vora: Any, encoder_dir: Path, device) -> tuple[None, None, dict]:
        return None, None, {}


@dataclass(frozen=True)
class GridInput:
    """The tower's feature map pooled to ``side`` x ``side`` cells of ``channels`` each -> a token per cell."""

    side: int
    channels: int
    kind: ClassVar[str] = "grid"
    text_stands_in: ClassVar[bool] = False  # text has no grid of features: stage 1 is paired images or nothing

    @property
    def tokens(self) -> int:
        return self.side * self.side

    @property
    def fields(self) -> dict[str, Any]:
        return {"embed_dim": self.channels, "visual_tokens": self.tokens, "visual_input": self.kind, "grid": self.side}

    def projector(self, hidden_size: int) -> nn.Module:
        return GridProjector(self.channels, hidden_size, self.tokens)

    def rows(self, embeddings: Path, visual: Path, name: str) -> EmbeddingSet:
        vectors = _visual_rows(visual, name, self.kind, "grid features")
        if (vectors.tokens, vectors.dim) != (self.tokens, self.tokens * self.channels):
            raise InputError(f"{vectors.dir}: {vectors.tokens} cells of {vectors.dim // vectors.tokens} channels per image, "
                             f"but the model reads {self.tokens} of {self.channels}; re-run `revision visual` "
                             f"with the model's settings")
        return vectors

    def reader(self, encoder_dir: Path, trained_on: dict, where: str, fix: str, device="cpu") -> nn.Module:
        from revision.feature_maps import GridFeatures

        return GridFeatures(_load_checked_encoder(encoder_dir, trained_on, where, fix, device), self.side)

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> GridInput:
        return cls(_geometry(fields, "grid"), fields["embed_dim"])

    @classmethod
    def from_params(cls, model: Any, vora: Any, rows: EmbeddingSet) -> GridInput:
        if rows.tokens != model.grid**2:
            raise InputError(f"{rows.dir}: holds {rows.tokens} cell(s) per image, model.grid asks for {model.grid} x "
                             f"{model.grid}; re-run `revision visual`")
        return cls(model.grid, rows.dim // rows.tokens)

    @classmethod
    def for_visual_stage(cls, model: Any, vora: Any, encoder_dir: Path, device) -> tuple[nn.Module, dict, dict]:
        from revision.encoders import load_encoder
        from revision.feature_maps import GridFeatures

        encoder, identity = load_encoder(encoder_dir)
        features = GridFeatures(encoder.to(device), model.grid)
        return features, identity, {"grid": model.grid, "channels": features.channels, "encoder": identity}


@dataclass(frozen=True)
class PixelsInput:
    """The image at ``image_size`` pixels a side -> a token per ``patch`` x ``patch`` patch."""

    image_size: int
    patch: int
    kind: ClassVar[str] = "pixels"
    text_stands_in: ClassVar[bool] = False

    def __post_init__(self):
        if self.image_size % self.patch:
            raise InputError(f"a {self.patch}-pixel patch does not tile a {self.image_size}-pixel image")

    @property
    def side(self) -> int:
        return self.image_size // self.patch

    @property
    def tokens(self) -> int:
        return self.side**2

    @property
    def fields(self) -> dict[str, Any]:
        dim = CHANNELS * self.image_size**2
        return {"embed_dim": dim, "visual_tokens": self.tokens, "visual_input": self.kind, "image_size": self.image_size,
                "patch": self.patch}

    def projector(self, hidden_size: int) -> nn.Module:
        return PatchEmbedding(self.image_size, self.patch, hidden_size)

    def rows(self, embeddings: Path, visual: Path, name: str) -> EmbeddingSet:
        vectors = _visual_rows(visual, name, self.kind, "pixel rows")
        if vectors.encoder != pixel_identity(self.image_size):
            raise InputError(f"{vectors.dir}: holds {vectors.encoder.get('name')}, the model reads "
                             f"{pixel_identity(self.image_size)['name']}; re-run `revision visual` with the model's "
                             f"vora.image_size")
        return vectors

    def reader(self, encoder_dir: Path, trained_on: dict, where: str, fix: str, device="cpu") -> nn.Module:
        return PixelRows(self.image_size)  # no encoder: the model reads the pixels

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> PixelsInput:
        return cls(_geometry(fields, "image_size"), _geometry(fields, "patch"))

    @classmethod
    def from_params(cls, model: Any, vora: Any, rows: EmbeddingSet) -> PixelsInput:
        if rows.encoder != pixel_identity(vora.image_size):
            raise InputError(f"{rows.dir}: holds {rows.encoder.get('name')}, vora.image_size asks for "
                             f"{pixel_identity(vora.image_size)['name']}; re-run `revision visual`")
        return cls(vora.image_size, vora.patch)

    @classmethod
    def for_visual_stage(cls, model: Any, vora: Any, encoder_dir: Path, device) -> tuple[nn.Module, dict, dict]:
        identity = pixel_identity(vora.image_size)
        return PixelRows(vora.image_size), identity, {"image_size": vora.image_size, "encoder": identity}


VisualInput = PooledInput | GridInput | PixelsInput
TYPES: dict[str, type] = {kind.kind: kind for kind in (PooledInput, GridInput, PixelsInput)}


def from_fields(fields: dict[str, Any]) -> VisualInput:
    """The visual input a checkpoint's mllm.json records (``fields`` as a type's ``fields`` wrote them)."""
    return TYPES[fields.get("visual_input", "pooled")].from_fields(fields)


def from_params(model: Any, vora: Any, rows: EmbeddingSet) -> VisualInput:
    """The visual input ``model.visual_input`` asks for (the ``model`` and ``vora`` params), reading ``rows``
    (stage 1's set: its encoder's dim, or the cells and channels the visual stage wrote)."""
    return TYPES[model.visual_input].from_params(model, vora, rows)


def stage_rows(model: Any, vora: Any, encoder_dir: Path, device) -> tuple[nn.Module | None, dict | None, dict]:
    """What the visual stage writes for ``model.visual_input``: (the reader of every image, the identity its
    rows record, the stage's record); types whose rows the embed stage writes give (None, None, record)."""
    reader, identity, record = TYPES[model.visual_input].for_visual_stage(model, vora, encoder_dir, device)
    return reader, identity, {"visual_input": model.visual_input, **record}
