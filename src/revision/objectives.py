"""Training objectives: what the trainer trains, behind one small interface.

An objective is a module around an MLLM that takes a ``Batch`` (named fields) and returns its losses by name
("loss" is the one trained; every entry is logged). It names its parameter groups, saves what a checkpoint keeps,
and rebuilds a model of its own shape to load a trained state into (under ZeRO-3 or FSDP the trained model
holds one process's shard). ``LanguageModeling`` is the plain LM loss on the assistant answers;
``revision.ross.Ross`` and ``revision.vora.Vora`` add their own losses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from revision.checkpoints import save_mllm
from revision.mllm import MLLM


@dataclass
class Batch:
    """A training batch: one row of ``vectors`` (embedding, grid features or pixels) per conversation, and the
    per-sample fields an objective may need."""

    vectors: torch.Tensor
    conversations: list
    targets: torch.Tensor | None = None  # Ross: the standardised target tokens of each image
    has_image: torch.Tensor | None = None  # false: a text-only sample (VoRA's mix), its vector unused


class Objective(nn.Module):
    """The interface the trainer calls; ``build_mllm`` makes a fresh MLLM of the trained one's shape."""

    def __init__(self, mllm: MLLM, build_mllm: Callable[[], MLLM]):
        super().__init__()
        self.mllm, self.build_mllm = mllm, build_mllm

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def param_groups(self, lr: float) -> list[dict]:
        """The optimizer's parameter groups: by default every trainable weight at the stage's ``lr``."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def save(self, folder: Path) -> None:
        """What a checkpoint keeps: by default the MLLM alone."""
        save_mllm(self.mllm, folder)

    def rebuild(self) -> Objective:
        """A fresh objective of the same shape (to load a trained state into)."""
        raise NotImplementedError


class LanguageModeling(Objective):
    """Cross-entropy on the assistant answers."""

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {"loss": self.mllm(batch.vectors, batch.conversations, batch.has_image).loss}

    def rebuild(self) -> LanguageModeling:
        return LanguageModeling(self.build_mllm(), self.build_mllm)
