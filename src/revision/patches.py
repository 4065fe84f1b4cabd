"""Pixels as visual input (VoRA): images as rows of pixels, and the patch embedding that turns them into tokens.

An image is resized to ``image_size`` a side, RGB (grey images get three equal channels), scaled to [-1, 1] and
flattened, so a set of images travels in the project's embedding format like any embedding set. The patch
embedding is the authors' design: a convolution with kernel = stride = ``patch``, RMSNorm, a learned position
per patch, and a bias-free linear map into the LM's width; one token per patch, row-major.
"""

from __future__ import annotations

import hashlib
import math

import torch
from PIL import Image
from torch import nn

CHANNELS = 3


def pixel_identity(image_size: int) -> dict:
    """What stands where an encoder's identity stands for a pixels model: the preprocessing."""
    name = f"pixels-{image_size}"
    return {"kind": "pixels", "name": name, "dim": CHANNELS * image_size**2, "id": hashlib.sha256(name.encode()).hexdigest()[:16]}


def image_side(row_dim: int) -> int:
    side = math.isqrt(row_dim // CHANNELS)
    if CHANNELS * side * side != row_dim:
        raise ValueError(f"{row_dim} values are not a square RGB image")
    return side


class PixelRows(nn.Module):
    """``encode_images`` -> [B, 3 · image_size²]: the images as a pixels model reads them."""

    tokens = 1

    def __init__(self, image_size: int):
        super().__init__()
        self.image_size, self.dim = image_size, CHANNELS * image_size**2

    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        from revision.encoders import pixel_tensor

        return pixel_tensor(images, self.image_size).flatten(1)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        raise ValueError("text has no pixels: only images can be a pixels model's visual input")


class PatchEmbedding(nn.Module):
    """Rows of pixels [B, 3 · S²] -> [B, (S / patch)², hidden_size] image tokens."""

    def __init__(self, embed_dim: int, hidden_size: int, visual_tokens: int):
        super().__init__()
        self.image_size, self.hidden_size = image_side(embed_dim), hidden_size
        side = math.isqrt(visual_tokens)
        if side * side != visual_tokens or self.image_size % side:
            raise ValueError(f"{visual_tokens} patches do not tile a {self.image_size}-pixel image")
        self.visual_tokens, self.patch = visual_tokens, self.image_size // side
        self.conv = nn.Conv2d(CHANNELS, hidden_size, self.patch, stride=self.patch)
        self.norm = nn.RMSNorm(hidden_size, eps=1e-6)
        self.positions = nn.Parameter(torch.randn(visual_tokens, hidden_size) * 0.02)
        self.out = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        images = pixels.view(-1, CHANNELS, self.image_size, self.image_size)
        patches = self.conv(images).flatten(2).transpose(1, 2)
        return self.out(self.norm(patches) + self.positions)
