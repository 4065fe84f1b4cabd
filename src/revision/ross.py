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
