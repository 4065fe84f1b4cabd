"""Ross's reconstructive loss: a small diffusion denoiser that reads the LM's hidden states at the visual positions.

The denoiser is the authors' DiT design at CPU width: adaLN-Zero blocks (modulation and output start at zero,
so the first prediction is 0 and the first loss is about 1), fixed 2-D sin-cos positions on the target grid,
and per-token conditioning c = timestep embedding + linear(SiLU(LayerNorm(h))), where h is the LM's final
hidden state at that visual position. Training adds noise to the target tokens of the same image (one per
visual token) on a 1000-step cosine schedule and regresses the noise (plain MSE), each image ``repeat`` times
with its own timestep and noise. The loss trains whatever produced ``h``; inference never calls the denoiser.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

STEPS = 1000


def noise_schedule():
    """The cosine ᾱ schedule (Nichol & Dhariwal), as diffusers' DDPM scheduler implements it."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=STEPS, beta_schedule="squaredcos_cap_v2")


def sincos_positions(grid: int, dim: int) -> torch.Tensor:
    """Fixed positions of a grid×grid token map, row-major: half the channels encode the row, half the column."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos positions need a width divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.cat([_sincos(rows.flatten(), dim // 2), _sincos(cols.flatten(), dim // 2)], dim=1)


def _sincos(position: torch.Tensor, dim: int) -> torch.Tensor:
    frequencies = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float32) / (dim // 2))
    angles = position.float()[:, None] * frequencies[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def timestep_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of integer timesteps, [B, dim]."""
    half = dim // 2
    frequencies = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * frequencies[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


def _zero(layer: nn.Linear) -> nn.Linear:
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def _plain_norm(width: int) -> nn.LayerNorm:
    return nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)


class Block(nn.Module):
    """Self-attention and MLP, each with adaLN-Zero modulation (shift, scale, gate) from the conditioning."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attention_norm, self.mlp_norm = _plain_norm(width), _plain_norm(width)
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(approximate="tanh"), nn.Linear(4 * width, width))
        self.modulation = _zero(nn.Linear(width, 6 * width))

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(F.silu(condition)).chunk(6, dim=-1)
        h = self.attention_norm(x) * (1 + scale1) + shift1
        x = x + gate1 * self.attention(h, h, h, need_weights=False)[0]
        return x + gate2 * self.mlp(self.mlp_norm(x) * (1 + scale2) + shift2)


class Denoiser(nn.Module):
    """Predicts the noise in ``noisy`` target tokens [B, g², target_dim] at timesteps ``t`` [B], given the LM's
    hidden states at the g² visual positions [B, g², hidden_size]."""

    def __init__(self, target_dim: int, hidden_size: int, grid: int, width: int = 256, depth: int = 3, heads: int = 4):
        super().__init__()
        self.width = width
        self.embed = nn.Linear(target_dim, width)
        self.register_buffer("positions", sincos_positions(grid, width), persistent=False)
        self.time = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.hidden_norm = _plain_norm(hidden_size)
        self.hidden = nn.Linear(hidden_size, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.final_norm = _plain_norm(width)
        self.final_modulation = _zero(nn.Linear(width, 2 * width))
        self.out = _zero(nn.Linear(width, target_dim))

    def forward(self, noisy: torch.Tensor, t: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        time = self.time(timestep_features(t, self.width).to(noisy.dtype))
        condition = time[:, None] + self.hidden(F.silu(self.hidden_norm(hidden.to(noisy.dtype))))
        x = self.embed(noisy) + self.positions.to(noisy.dtype)
        for block in self.blocks:
            x = block(x, condition)
        shift, scale = self.final_modulation(F.silu(condition)).chunk(2, dim=-1)
        return self.out(self.final_norm(x) * (1 + scale) + shift)


def denoising_loss(
    denoiser: Denoiser, schedule, targets: torch.Tensor, hidden: torch.Tensor, repeat: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:  # fmt: skip
    """MSE between the noise added to ``targets`` and the denoiser's prediction of it, each image ``repeat``
    times with its own timestep and noise."""
    targets, hidden = targets.repeat_interleave(repeat, 0), hidden.repeat_interleave(repeat, 0)
    t = torch.randint(0, STEPS, (targets.shape[0],), generator=generator, device=generator.device if generator else "cpu")
    noise = torch.randn(targets.shape, generator=generator, device=t.device, dtype=targets.dtype)
    t, noise = t.to(targets.device), noise.to(targets.device)
    noisy = schedule.add_noise(targets, noise, t)
    return F.mse_loss(denoiser(noisy, t, hidden).float(), noise.float())


# ---------------------------------------------------------------- targets


class TargetTokenizer(nn.Module):
    """Ross's frozen fine-grained targets of an image, one token per visual token of a ``grid``×``grid`` map.

    ``kind="features"`` stands in for the authors' VAE latent: the image at 16·grid px through the bundled
    EfficientNet-Lite0 up to its last stride-8 block (a 2·grid map), each 2×2 window folded into channels.
    ``kind="pixels"``: the image at 8·grid px, each 8×8 RGB patch one token. Standardise the tokens per channel
    with statistics of the training split (``channel_stats``) before they become diffusion targets.
    """

    def __init__(self, grid: int, kind: str = "features"):
        super().__init__()
        from revision.encoders import ImageTower

        if kind not in ("features", "pixels"):
            raise ValueError(f"Ross targets are 'features' or 'pixels', got {kind!r}")
        self.grid, self.kind = grid, kind
        with torch.random.fork_rng():  # the tiny tower (pixels: only its preprocessing is used) seeds torch
            self.tower = ImageTower("efficientnet_lite0" if kind == "features" else "tiny", (16 if kind == "features" else 8) * grid, 0)
        self.tower.requires_grad_(False)
        self.blocks = self._stride8_blocks() if kind == "features" else 0
        self.dim = self(_blank(self.tower.image_size)).shape[-1]

    def _stride8_blocks(self) -> int:
        """How many EfficientNet blocks run before the map shrinks below stride 8."""
        size = self.tower.image_size
        x = self._stem(torch.zeros(1, 3, size, size))
        last = 0
        for index, block in enumerate(self.tower.model._blocks):
            x = block(x)
            if x.shape[-1] == size // 8:
                last = index + 1
        return last

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        model = self.tower.model
        return model._swish(model._bn0(model._conv_stem(x)))

    @torch.no_grad()
    def forward(self, images: list) -> torch.Tensor:
        """[B, grid², dim] target tokens, row-major like the visual tokens."""
        x = self.tower.preprocess(images).to(next(self.tower.parameters()).device)
        if self.kind == "features":
            x = self._stem(x)
            for block in self.tower.model._blocks[: self.blocks]:
                x = block(x)
        fold = x.shape[-1] // self.grid  # 2 for features, 8 for pixels
        return F.pixel_unshuffle(x, fold).flatten(2).transpose(1, 2)


def _blank(size: int) -> list:
    from PIL import Image

    return [Image.new("RGB", (size, size))]


def channel_stats(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation over every token of every image ([N, grid², dim])."""
    flat = tokens.reshape(-1, tokens.shape[-1]).double()
    return flat.mean(0).float(), flat.std(0).clamp(min=1e-6).float()


def standardize(tokens: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (tokens - mean) / std
