"""VoRA's stage 1: vision LoRA in the LM's first blocks, distilled block by block from a frozen image network.

The MLLM is a pixels model (``revision.visual_input.PixelsInput``: patch embedding, bidirectional image attention). Stage 1
wraps its LM in peft LoRA on all seven projections of the first ``blocks`` blocks (base weights frozen, no new
biases) and adds, per teacher block, a head (RMSNorm + linear to the teacher's width) on the LM's hidden state
after j - 1 + ``distill_offset`` layers at the image tokens. The distillation loss is 1 - cosine between head
output and teacher feature, averaged over image tokens, then over blocks; the teacher sees the same pixels.
The checkpoint keeps the LoRA (merged when loaded) and the patch embedding; heads and teacher are dropped.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from revision.config import VoraConfig
from revision.errors import InputError
from revision.mllm import MLLM
from revision.objectives import Batch, Objective
from revision.visual_input import CHANNELS

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def add_vision_lora(model: MLLM, cfg: VoraConfig) -> MLLM:
    """LoRA (peft) on the seven projections of the LM's first ``cfg.blocks`` blocks; the base LM frozen."""
    from peft import LoraConfig, get_peft_model

    layers = model.lm.config.num_hidden_layers
    if cfg.blocks > layers:
        raise InputError(f"vora.blocks is {cfg.blocks}, but the LM has {layers} blocks")
    lora = LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, bias="none", target_modules=list(PROJECTIONS),
        layers_to_transform=list(range(cfg.blocks)), layers_pattern="layers", task_type="CAUSAL_LM",
    )
    model.lm = get_peft_model(model.lm, lora)
    return model


class Teacher(nn.Module):
    """A frozen image network's block outputs for the pixels a pixels model reads: EfficientNet-Lite0's seven
    stage outputs and its head (or the tiny conv net's two convolutions), each average-pooled to the patch grid,
    as tokens [B, grid², channels]."""

    def __init__(self, kind: str, image_size: int, grid: int):
        super().__init__()
        from revision.encoders import ImageTower

        with torch.random.fork_rng():  # the tiny tower seeds torch
            self.tower = ImageTower(kind, image_size, 0)
        self.tower.requires_grad_(False)
        self.image_size, self.grid = image_size, grid
        probe = self._outputs(torch.zeros(1, CHANNELS, image_size, image_size))
        self.widths = [output.shape[1] for output in probe]

    def _outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        model = self.tower.model
        if not hasattr(model, "_blocks"):  # the tiny conv net: conv + ReLU twice
            first = model.net[:2](x)
            return [first, model.net[2:4](first)]
        x = self.tower.stem(x)
        outputs = []
        for block in model._blocks:
            x = block(x)
            if outputs and outputs[-1].shape == x.shape:
                outputs[-1] = x  # the same stage: keep its last block's output
            else:
                outputs.append(x)
        return outputs + [model._swish(model._bn1(model._conv_head(x)))]

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = F.interpolate(images.float(), size=self.image_size, mode="bilinear", align_corners=False)
        return [F.adaptive_avg_pool2d(o, self.grid).flatten(2).transpose(1, 2) for o in self._outputs(x)]


class Vora(Objective):
    """A pixels MLLM in VoRA's stage 1: LM loss + ``distill_weight`` × the block-wise distillation loss. Batches
    may mix in text-only samples (``Batch.has_image`` false), which have the LM loss only. The checkpoint keeps
    the MLLM alone: its LoRA adapter (merged on load) and patch embedding; heads and teacher stay behind."""

    def __init__(self, mllm: MLLM, build_mllm: Callable[[], MLLM], cfg: VoraConfig):
        super().__init__(mllm, build_mllm)
        self.cfg = cfg
        if not cfg.distill_weight:  # no teacher, no heads: nothing unused for DDP to wait on
            self.teacher, self.heads = None, nn.ModuleList()
            return
        self.teacher = Teacher(cfg.teacher, cfg.teacher_size, mllm.config.visual.side).to(mllm.device)
        hidden = mllm.projector.hidden_size
        deepest = len(self.teacher.widths) - 1 + cfg.distill_offset
        if deepest > mllm.lm.config.num_hidden_layers:
            raise InputError(f"vora: {len(self.teacher.widths)} teacher blocks from offset {cfg.distill_offset} need "
                             f"{deepest} LM layers; the LM has {mllm.lm.config.num_hidden_layers}")
        self.heads = nn.ModuleList(
            nn.Sequential(nn.RMSNorm(hidden, eps=1e-6), nn.Linear(hidden, width)) for width in self.teacher.widths
        ).to(mllm.device)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        mllm, pixels = self.mllm, batch.vectors
        lm = mllm(pixels, batch.conversations, batch.has_image)
        if self.teacher is None:
            return {"loss": lm.loss}
        rows = [row for row, start in enumerate(lm.batch.image_start) if start >= 0]
        if rows:
            side = mllm.config.visual.image_size
            teacher = self.teacher(pixels[rows].to(mllm.device).view(-1, CHANNELS, side, side))
            per_block = [
                self.block_loss(head, mllm.visual_states(lm.batch, lm.hidden_states[j + self.cfg.distill_offset], rows), target)
                for j, (head, target) in enumerate(zip(self.heads, teacher))
            ]
        else:  # a batch of text only: nothing to distil, but every head stays in the graph (DDP expects its grads)
            per_block = [sum(p.sum() for p in head.parameters()) * 0.0 for head in self.heads]
        distill = torch.stack(per_block).mean()
        blocks = {f"distill_block{j + 1}": loss for j, loss in enumerate(per_block)}
        return {"loss": lm.loss + self.cfg.distill_weight * distill, "lm_loss": lm.loss, "distill_loss": distill, **blocks}

    @staticmethod
    def block_loss(head: nn.Module, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """1 - cosine between the head's output and the teacher's feature, averaged over image tokens."""
        return (1 - F.cosine_similarity(head(hidden).float(), target.float(), dim=-1)).mean()

    def rebuild(self) -> Vora:
        return Vora(self.build_mllm(), self.build_mllm, self.cfg)
