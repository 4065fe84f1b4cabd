"""Ross's reconstructive loss: a small diffusion denoiser that reads the LM's hidden states at the visual positions.

The denoiser is the authors' DiT design at CPU width: adaLN-Zero blocks (modulation and output start at zero,
so the first prediction is 0 and the first loss is about 1), fixed 2-D sin-cos positions on the target grid,
and per-token conditioning c = timestep embedding + linear(SiLU(LayerNorm(h))), where h is the LM's final
hidden state at that visual position. Training adds noise to the target tokens of the same image (one per
visual token) on a 1000-step cosine schedule and regresses the noise (plain MSE), each image ``repeat`` times
with its own timestep and noise. The loss trains whatever produced ``h``; inference never calls the denoiser.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from revision.checkpoints import save_mllm
from revision.config import RossConfig
from revision.errors import InputError
from revision.images import read_rows
from revision.mllm import MLLM
from revision.objectives import Batch, Objective

STEPS = 1000
ROSS_DIR = "ross"  # in a checkpoint folder: the denoiser and its target statistics (training only)
TARGET_BATCH = 64


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
) -> torch.Tensor:
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
        x = self.tower.stem(torch.zeros(1, 3, size, size))
        last = 0
        for index, block in enumerate(self.tower.model._blocks):
            x = block(x)
            if x.shape[-1] == size // 8:
                last = index + 1
        return last

    @torch.no_grad()
    def forward(self, images: list) -> torch.Tensor:
        """[B, grid², dim] target tokens, row-major like the visual tokens."""
        x = self.tower.preprocess(images).to(next(self.tower.parameters()).device)
        if self.kind == "features":
            x = self.tower.stem(x)
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


# ---------------------------------------------------------------- Ross as a training objective


class Ross(Objective):
    """LM loss + ``weight`` × the denoising loss of each image's target tokens, conditioned on the LM's final
    hidden states at the visual positions. Batches carry the standardised targets."""

    def __init__(
        self, mllm: MLLM, build_mllm: Callable[[], MLLM], denoiser: Denoiser, settings: dict[str, Any],
        mean: torch.Tensor, std: torch.Tensor,
    ):
        super().__init__(mllm, build_mllm)
        self.denoiser, self.settings = denoiser.to(mllm.device), settings
        self.register_buffer("target_mean", mean.to(mllm.device))
        self.register_buffer("target_std", std.to(mllm.device))
        self.schedule = noise_schedule()

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        lm = self.mllm(batch.vectors, batch.conversations)
        hidden = self.mllm.visual_states(lm.batch, lm.hidden_states[-1])
        denoise = denoising_loss(self.denoiser, self.schedule, batch.targets.to(hidden.device), hidden, self.settings["repeat"])
        return {"loss": lm.loss + self.settings["weight"] * denoise, "lm_loss": lm.loss, "denoise_loss": denoise}

    def param_groups(self, lr: float) -> list[dict]:
        """The MLLM's trainable weights at ``lr``, the denoiser's at ``lr`` × lr_scale."""
        trained = [p for p in self.mllm.parameters() if p.requires_grad]
        return [{"params": trained}, {"params": list(self.denoiser.parameters()), "lr": lr * self.settings["lr_scale"]}]

    def rebuild(self) -> Ross:
        denoiser = Denoiser(**self.settings["denoiser"])
        return Ross(self.build_mllm(), self.build_mllm, denoiser, self.settings, self.target_mean, self.target_std)

    def save(self, folder: Path) -> None:
        """The MLLM as every checkpoint, plus ``ross/``: the denoiser, its settings and the target statistics."""
        save_mllm(self.mllm, folder)
        (folder / ROSS_DIR).mkdir()
        tensors = {f"denoiser.{k}": v.contiguous().cpu() for k, v in self.denoiser.state_dict().items()}
        tensors |= {"target_mean": self.target_mean.cpu(), "target_std": self.target_std.cpu()}
        save_file(tensors, folder / ROSS_DIR / "denoiser.safetensors")
        (folder / ROSS_DIR / "ross.json").write_text(json.dumps(self.settings, indent=1))


def target_tokens(tokenizer: TargetTokenizer, images: list[tuple[int, Path]], where: Path) -> torch.Tensor:
    """[N, grid², dim] raw target tokens of the images given as (manifest row, path)."""
    batches = [tokenizer(read_rows(images[i : i + TARGET_BATCH], where)) for i in range(0, len(images), TARGET_BATCH)]
    return torch.cat(batches).cpu()


def attach_ross(
    mllm: MLLM, build_mllm: Callable[[], MLLM], samples, cfg: RossConfig, where: Path, previous: Path | None = None
) -> Ross:
    """``mllm`` with Ross's loss, and ``samples`` given their standardised target tokens. A ``previous``
    checkpoint trained with Ross (stage 1) hands on its denoiser and target statistics when its settings match
    ``cfg``; otherwise the denoiser starts fresh and the statistics come from these samples."""
    if samples.images is None:
        raise InputError(f"{where}: Ross needs the image of every sample, and these samples have none")
    grid = mllm.config.visual.side
    if grid is None:
        raise InputError(f"Ross reconstructs one target per visual token on a square grid: model.visual_tokens "
                         f"must be a square (4, 9, 16, ...), got {mllm.config.visual.tokens}")
    tokenizer = TargetTokenizer(grid, cfg.target)
    targets = target_tokens(tokenizer, samples.images, where)
    hidden_size = mllm.lm.get_input_embeddings().embedding_dim
    shape = {"target_dim": tokenizer.dim, "hidden_size": hidden_size, "grid": grid, "width": cfg.width,
             "depth": cfg.depth, "heads": cfg.heads}
    settings = {**cfg.model_dump(), "denoiser": shape}
    denoiser, stats = Denoiser(**shape), None
    kept = _previous_denoiser(previous, settings) if previous is not None else None
    if kept is not None:
        denoiser, stats = kept
    mean, std = stats or channel_stats(targets)
    samples.targets = standardize(targets, mean, std)
    return Ross(mllm, build_mllm, denoiser, settings, mean, std)


def _previous_denoiser(folder: Path, settings: dict) -> tuple[Denoiser, tuple[torch.Tensor, torch.Tensor]] | None:
    """The denoiser and target statistics a checkpoint saved, if it has them with the same targets and shape."""
    config = folder / ROSS_DIR / "ross.json"
    if not config.exists():
        return None
    saved = json.loads(config.read_text())
    if saved["target"] != settings["target"] or saved["denoiser"] != settings["denoiser"]:
        return None
    tensors = load_file(folder / ROSS_DIR / "denoiser.safetensors")
    denoiser = Denoiser(**saved["denoiser"])
    denoiser.load_state_dict({k.removeprefix("denoiser."): v for k, v in tensors.items() if k.startswith("denoiser.")})
    return denoiser, (tensors["target_mean"], tensors["target_std"])
