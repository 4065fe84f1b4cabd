"""The training loop shared by stage 1 (pretrain) and stage 2 (finetune), readable top to bottom.

Accelerate handles devices, DDP, gradient accumulation and mixed precision; AdamW with linear warmup and
cosine decay; a fixed, seeded sample order per epoch so an interrupted run resumes on exactly the batch it
stopped at (``accelerator.save_state`` every ``checkpoint_every`` optimizer steps).
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup


@dataclass(frozen=True)
class LoopConfig:
    seed: int
    epochs: float
    batch_size: int
    lr: float
    weight_decay: float
    warmup_ratio: float
    checkpoint_every: int
    max_grad_norm: float = 1.0


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()


def _resume(accelerator: Accelerator, ckpt_dir: Path, fingerprint: str) -> list[dict]:
    """Load the newest checkpoint made with the same fingerprint (params + inputs); returns its history."""
    meta = ckpt_dir / "progress.json"
    if not meta.exists():
        return []
    progress = json.loads(meta.read_text())
    if progress.get("fingerprint") != fingerprint:
        return []
    accelerator.load_state(str(ckpt_dir / "state"))
    accelerator.print(f"resuming from the checkpoint at step {len(progress['history'])} in {ckpt_dir}")
    return progress["history"]


def _checkpoint(accelerator: Accelerator, ckpt_dir: Path, fingerprint: str, history: list[dict]) -> None:
    tmp = ckpt_dir / "state.tmp"
    accelerator.save_state(str(tmp))  # the main process writes; every rank must call it
    if accelerator.is_main_process:
        shutil.rmtree(ckpt_dir / "state", ignore_errors=True)
        tmp.rename(ckpt_dir / "state")
        (ckpt_dir / "progress.json").write_text(json.dumps({"fingerprint": fingerprint, "history": history}))
    accelerator.wait_for_everyone()


def train(
    model: torch.nn.Module,
    dataset: Dataset,
    collate: Callable,
    loss_fn: Callable[[torch.nn.Module, object], torch.Tensor],
    cfg: LoopConfig,
    accelerator: Accelerator,
    ckpt_dir: Path,
    fingerprint: str,
    log: Callable[[dict, int], None] = lambda metrics, step: None,
) -> tuple[torch.nn.Module, list[dict]]:
    """Train the parameters of ``model`` that require grad; returns the prepared (wrapped) model, which
    ``accelerator.get_state_dict`` needs under ZeRO-3 or FSDP, and one row per optimizer step."""
    accum = accelerator.gradient_accumulation_steps
    # each process sees its own share of every epoch, ``batch_size`` samples at a time
    batches_per_epoch = math.ceil(len(dataset) / (cfg.batch_size * accelerator.num_processes))
    steps_per_epoch = max(1, batches_per_epoch // accum)
    total_steps = max(1, round(cfg.epochs * steps_per_epoch))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, round(cfg.warmup_ratio * total_steps), total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    history = _resume(accelerator, ckpt_dir, fingerprint)
    step = len(history)
    progress = tqdm(total=total_steps, initial=step, desc="train", disable=not accelerator.is_local_main_process)
    model.train()
    while step < total_steps:
        epoch, done_in_epoch = divmod(step, steps_per_epoch)
        order = Subset(dataset, epoch_order(len(dataset), cfg.seed, epoch))
        # A private generator: starting an iterator draws a seed from it, and from the global RNG otherwise,
        # so a resumed run (one more iterator) would shift every later dropout mask.
        private = torch.Generator().manual_seed(cfg.seed)
        loader = DataLoader(order, batch_size=cfg.batch_size, collate_fn=collate, generator=private)
        loader = accelerator.prepare_data_loader(loader)
        loader = accelerator.skip_first_batches(loader, done_in_epoch * accum)
        for batch_index, batch in enumerate(loader):
            if batch_index >= (steps_per_epoch - done_in_epoch) * accum:
                break  # a ragged tail shorter than one accumulation window is skipped, the same way every run
            with accelerator.accumulate(model):
                loss = loss_fn(model, batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            step += 1
            row = {"step": step, "loss": accelerator.gather(loss.detach()).mean().item(), "lr": scheduler.get_last_lr()[0]}
            history.append(row)
            log({"loss": row["loss"], "lr": row["lr"]}, step)
            progress.update(1)
            progress.set_postfix(loss=f"{row['loss']:.3f}")
            if step % cfg.checkpoint_every == 0 and step < total_steps:
                _checkpoint(accelerator, ckpt_dir, fingerprint, history)
            if step >= total_steps:
                break
    progress.close()
    return model, history
