"""Per-location image features (grid visual input) instead of one pooled embedding.

LLaVA feeds the LM one token per image patch, taken from the vision tower before its pooling and its
projection into the joint space. ``GridFeatures`` does the same with any encoder of the project: the tower's
last feature map (EfficientNet-Lite0: 1280 channels, 4x4 at 128 px; the tiny conv net: 32 channels; a CLIP
ViT: its patch tokens before the projection), average-pooled to ``grid`` x ``grid`` cells, row-major. Its
rows are flattened (``grid``² x channels) so they travel in the project's embedding format unchanged;
the embedding set records ``tokens`` = ``grid``² and the MLLM's grid projector maps each cell on
its own (``revision.visual_input.GridInput``).

Only images have grids: text embeddings (raw or aligned) stay pooled, so a grid model's stage 1 is paired
images or nothing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from revision.errors import InputError


class GridFeatures(nn.Module):
    """``encode_images`` -> [B, grid² · channels] per-location tower features of ``encoder`` (frozen)."""

    def __init__(self, encoder: nn.Module, grid: int):
        super().__init__()
        self.encoder, self.grid, self.tokens = encoder, grid, grid * grid
        self.channels = feature_map(encoder, [Image.new("RGB", (32, 32))]).shape[1]
        self.dim = self.tokens * self.channels

    @torch.no_grad()
    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        cells = F.adaptive_avg_pool2d(feature_map(self.encoder, images).float(), self.grid)
        return cells.flatten(2).transpose(1, 2).flatten(1)  # [B, C, g, g] -> [B, g², C] -> [B, g² · C]

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        raise InputError("text has no grid of features: only images can be grid visual input")


def feature_map(encoder: nn.Module, images: list[Image.Image]) -> torch.Tensor:
    """The last spatial feature map [B, C, h, w] the encoder's image tower computes before pooling."""
    from revision.encoders import HFClipEncoder, LitEncoder, OpenClipEncoder, TinyConvNet

    with torch.no_grad():
        if isinstance(encoder, LitEncoder):
            tower = encoder.image_tower
            x = tower.preprocess(images).to(next(tower.parameters()).device)
            if isinstance(tower.model, TinyConvNet):
                return tower.model.net[:-2](x)  # the convolutions, without the global pooling
            return tower.features(x)
        if isinstance(encoder, OpenClipEncoder):
            return _open_clip_map(encoder, images)
        if isinstance(encoder, HFClipEncoder):
            batch = encoder.processor(images=[img.convert("RGB") for img in images], return_tensors="pt")
            hidden = encoder.model.vision_model(pixel_values=batch["pixel_values"].to(encoder.model.device))
            return _square(hidden.last_hidden_state[:, 1:], f"{encoder.model.name_or_path}")  # drop the CLS token
    raise InputError(f"grid visual input is not available for a {type(encoder).__name__}")


def _open_clip_map(encoder: nn.Module, images: list[Image.Image]) -> torch.Tensor:
    visual = encoder.model.visual
    if not hasattr(visual, "output_tokens"):
        raise InputError(f"grid visual input needs a ViT image tower; open_clip's {type(visual).__name__} has no patch tokens")
    x = torch.stack([encoder.transform(img.convert("RGB")) for img in images]).to(next(visual.parameters()).device)
    visual.output_tokens = True
    try:
        _, tokens = visual(x)
    finally:
        visual.output_tokens = False
    return _square(tokens, type(visual).__name__)


def _square(tokens: torch.Tensor, where: str) -> torch.Tensor:
    """Patch tokens [B, n, C] of a square patch grid as a map [B, C, √n, √n]."""
    side = math.isqrt(tokens.shape[1])
    if side * side != tokens.shape[1]:
        raise InputError(f"{where}: {tokens.shape[1]} patch tokens do not form a square grid")
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)
