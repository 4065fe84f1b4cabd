"""Train the LiT heads: CLIP's symmetric InfoNCE (open_clip's ``ClipLoss``) on precomputed tower features."""

from __future__ import annotations

import torch
from open_clip.loss import ClipLoss

from revision.config import LitConfig
from revision.encoders import LitEncoder


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
            loss = loss_fn(image, text, encoder.logit_scale.exp().clamp(max=100))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
        history.append(sum(losses) / len(losses))
        if log:
            log({"contrastive_loss": history[-1]}, epoch)
    return history
