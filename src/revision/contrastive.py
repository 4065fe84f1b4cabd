"""Train the LiT heads: CLIP's symmetric InfoNCE (open_clip's ``ClipLoss``) on precomputed tower features."""

from __future__ import annotations

from pathlib import Path

import torch
from open_clip.loss import ClipLoss

from revision.config import EncoderConfig, LitConfig
from revision.encoders import LitEncoder, batched
from revision.images import read_rows
from revision.layout import ENCODER_PAIRS, read_manifest
from revision.zeroshot import modality_gap


def fit_lit_heads(encoder: LitEncoder, prepared: Path, cfg: EncoderConfig, log=None) -> tuple[list[float], dict[str, float]]:
    """Both frozen towers' features of the encoder pairs (computed once), then the heads trained on them;
    returns the mean contrastive loss of each epoch, and the modality gap of the pairs before and after."""
    pairs = read_manifest(prepared, ENCODER_PAIRS)
    where = prepared / ENCODER_PAIRS.file
    rows = [(row, prepared / path) for row, path in enumerate(pairs["image"])]
    read = lambda batch: encoder.image_tower(read_rows(batch, where))  # noqa: E731
    image_feats = batched(read, rows, cfg.batch_size, "image features")
    text_feats = batched(encoder.text_tower, pairs["caption"].tolist(), cfg.batch_size, "text features")
    gap_before = pairs_gap(encoder, text_feats, image_feats)
    history = train_heads(encoder, text_feats, image_feats, cfg.lit, cfg.seed, log)
    gaps = {"modality_gap_pairs_untrained": gap_before, "modality_gap_pairs": pairs_gap(encoder, text_feats, image_feats)}
    return history, gaps


@torch.no_grad()
def pairs_gap(encoder: LitEncoder, text_feats: torch.Tensor, image_feats: torch.Tensor) -> float:
    """The modality gap of the projected features."""
    return modality_gap(encoder.project_text(text_feats).numpy(), encoder.project_images(image_feats).numpy())


def train_heads(
    encoder: LitEncoder, text_feats: torch.Tensor, image_feats: torch.Tensor, cfg: LitConfig, seed: int, log=None
) -> list[float]:
    """Fit the projection heads on paired features; returns the mean loss of each epoch."""
    generator = torch.Generator().manual_seed(seed)
    heads = [p for p in encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(heads, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, len(text_feats) // cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, cfg.epochs * steps_per_epoch))
    loss_fn = ClipLoss()
    history = []
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(text_feats), generator=generator)
        losses = []
        for step in range(steps_per_epoch):
            idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            text = encoder.project_text(text_feats[idx])
            image = encoder.project_images(image_feats[idx])
            loss = loss_fn(image, text, encoder.logit_scale.exp().clamp(max=100))  # CLIP's clamp
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
        history.append(sum(losses) / len(losses))
        if log:
            log({"contrastive_loss": history[-1]}, epoch)
    return history
