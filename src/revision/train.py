"""Training an MLLM stage (stage 1 pretrain, stage 2 finetune): the loop, readable top to bottom, and
``train_and_save``, which runs it and writes the stage's model, metrics and loss curve.

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
from typing import TYPE_CHECKING, Callable, Sequence

import pandas as pd
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from revision.config import TrainConfig
from revision.outputs import atomic_dir, atomic_file, write_json
from revision.tracking import StageRun
from revision.training_data import collate

if TYPE_CHECKING:
    from revision.training_setup import TrainingSetup

GROUP_WINDOW = 16  # batches sorted by length together: wide enough to pad little, narrow enough to stay random


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


def epoch_order(n: int, seed: int, epoch: int, lengths: Sequence[int] | None = None, batch_size: int = 1) -> list[int]:
    """A seeded shuffle of ``range(n)``. Given sample ``lengths``, each window of ``GROUP_WINDOW`` batches is
    sorted by length and cut into batches, and the batches are shuffled: a batch pads to its longest sample,
    so similar lengths together spend less compute on padding. A short last batch stays last, where the
    DataLoader cuts it."""
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(n, generator=generator).tolist()
    if lengths is None or batch_size < 2:
        return order
    window = GROUP_WINDOW * batch_size
    grouped = [i for start in range(0, n, window) for i in sorted(order[start : start + window], key=lengths.__getitem__)]
    batches = [grouped[start : start + batch_size] for start in range(0, n, batch_size)]
    tail = batches.pop() if n % batch_size else []
    return [i for k in torch.randperm(len(batches), generator=generator).tolist() for i in batches[k]] + tail


def _resume(accelerator: Accelerator, ckpt_dir: Path, fingerprint: str) -> list[dict]:
    """Load the newest checkpoint made with the same fingerprint (params + inputs); returns its history."""
    meta = ckpt_dir / "progress.json"
    if not meta.exists():
        return []
    progress = json.loads(meta.read_text())
    if progress.get("fingerprint") != fingerprint:
        return []
    accelerator.load_state(str(ckpt_dir / "state"), strict=False)  # the frozen weights are not in it
    accelerator.print(f"resuming from the checkpoint at step {len(progress['history'])} in {ckpt_dir}")
    return progress["history"]


def _trained_weights_only(models: list[torch.nn.Module], weights: list[dict], output_dir: str) -> None:
    """Accelerate's save hook: a checkpoint keeps the weights being trained, not the frozen LM (half a GB
    written every ``checkpoint_every`` steps for nothing). DeepSpeed and FSDP save their own way (no weights)."""
    for i, state in enumerate(weights):
        trained = {name for name, param in models[i].named_parameters() if param.requires_grad}
        weights[i] = {name: tensor for name, tensor in state.items() if name in trained}


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
    lengths: Sequence[int] | None = None,
    param_groups: list[dict] | None = None,
) -> tuple[torch.nn.Module, list[dict]]:
    """Train the parameters of ``model`` that require grad (or the optimizer's ``param_groups``); returns the
    prepared (wrapped) model, which ``accelerator.get_state_dict`` needs under ZeRO-3 or FSDP, and one row per
    optimizer step. ``loss_fn`` returns the loss, or a dict of named losses whose "loss" is trained and whose
    every entry is logged. Given sample ``lengths``, batches group samples of similar length (``epoch_order``)."""
    accum = accelerator.gradient_accumulation_steps
    # each process sees its own share of every epoch, ``batch_size`` samples at a time
    batches_per_epoch = math.ceil(len(dataset) / (cfg.batch_size * accelerator.num_processes))
    steps_per_epoch = max(1, batches_per_epoch // accum)
    total_steps = max(1, round(cfg.epochs * steps_per_epoch))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(param_groups or trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, round(cfg.warmup_ratio * total_steps), total_steps)
    deepspeed = accelerator.state.deepspeed_plugin
    if deepspeed is not None and deepspeed.is_auto("train_micro_batch_size_per_gpu"):
        # DeepSpeed reads the batch size off a DataLoader passed to prepare; ours are made per epoch, below
        deepspeed.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    accelerator.register_save_state_pre_hook(_trained_weights_only)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    history = _resume(accelerator, ckpt_dir, fingerprint)
    step = len(history)
    progress = tqdm(total=total_steps, initial=step, desc="train", disable=not accelerator.is_local_main_process)
    model.train()
    while step < total_steps:
        epoch, done_in_epoch = divmod(step, steps_per_epoch)
        order = Subset(dataset, epoch_order(len(dataset), cfg.seed, epoch, lengths, cfg.batch_size))
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
                losses = loss_fn(model, batch)
                losses = losses if isinstance(losses, dict) else {"loss": losses}
                accelerator.backward(losses["loss"])
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            step += 1
            means = {name: accelerator.gather(value.detach()).mean().item() for name, value in losses.items()}
            row = {"step": step, "loss": means.pop("loss"), "lr": scheduler.get_last_lr()[0], **means}
            history.append(row)
            log({name: value for name, value in row.items() if name != "step"}, step)
            progress.update(1)
            progress.set_postfix(loss=f"{row['loss']:.3f}")
            if step % cfg.checkpoint_every == 0 and step < total_steps:
                _checkpoint(accelerator, ckpt_dir, fingerprint, history)
            if step >= total_steps:
                break
    progress.close()
    return model, history


# ----------------------------------------------------------------------------------------- a whole stage


@dataclass(frozen=True)
class StageOutputs:
    """Where a training stage writes: the model folder, its DVC metrics and loss curve, and the resumable
    checkpoints (deleted once the model is saved)."""

    model: Path
    metrics: Path
    loss_curve: Path
    checkpoints: Path


def loop_config(cfg: TrainConfig) -> LoopConfig:
    return LoopConfig(cfg.seed, cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay, cfg.warmup_ratio, cfg.checkpoint_every)


def loss_names(history: list[dict]) -> list[str]:
    """"loss" and whatever named parts the rows also carry (Ross: lm_loss, denoise_loss)."""
    return ["loss"] + [name for name in (history[0] if history else {}) if name not in ("step", "loss", "lr")]


def loss_summary(history: list[dict], window: int = 10) -> dict[str, float]:
    """Mean of each loss over the first and last ``window`` optimizer steps (single steps are noisy)."""
    if not history:
        return {"steps": 0}
    window = max(1, min(window, len(history) // 2))  # the two windows never overlap
    summary: dict[str, float] = {"steps": len(history)}
    for name in loss_names(history):
        values = [row[name] for row in history]
        summary[f"{name}_first"] = sum(values[:window]) / window
        summary[f"{name}_last"] = sum(values[-window:]) / window
    return summary


def write_loss_csv(path: Path, history: list[dict]) -> None:
    columns = ["step", "loss", "lr"] + loss_names(history)[1:]
    with atomic_file(path) as tmp:
        pd.DataFrame(history, columns=columns).to_csv(tmp, index=False)


def train_and_save(setup: TrainingSetup, run: StageRun, outputs: StageOutputs) -> dict:
    """Train ``setup``'s objective on its samples (none: the model is saved as built), then on the main process
    save the checkpoint atomically, write the metrics and loss curve, and drop the checkpoints the finished run
    no longer needs.

    The saved weights are ``accelerator.get_state_dict``'s full copy loaded into the objective's ``rebuild()``,
    a fresh model of the same shape: under ZeRO-3 or FSDP the trained model only holds this process's shard."""
    accelerator, cfg, samples, model = setup.accelerator, setup.cfg, setup.samples, setup.objective
    history = []
    if samples is not None:
        groups = model.param_groups(cfg.lr)
        model, history = train(
            model, samples, collate, lambda m, batch: m(batch), loop_config(cfg), accelerator, outputs.checkpoints,
            setup.run_id, run.log_metrics, samples.lengths(), groups,
        )
    state = accelerator.get_state_dict(model)  # every process takes part: sharded weights are gathered here
    precision = accelerator.mixed_precision  # params' `auto` as resolved here: no (fp32) | bf16 | fp16
    summary = {**setup.extra, "precision": precision, "samples": len(samples) if samples is not None else 0,
               **loss_summary(history)}
    run.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))})
    run.log_params({"precision": precision})
    if accelerator.is_main_process:
        trained = setup.objective.rebuild()
        trained.load_state_dict(state)
        trained.mllm.config.precision = {**trained.mllm.config.precision, setup.stage: precision}
        with atomic_dir(outputs.model) as tmp:
            trained.save(tmp)
        write_json(outputs.metrics, summary)
        write_loss_csv(outputs.loss_curve, history)
        shutil.rmtree(outputs.checkpoints, ignore_errors=True)
    accelerator.wait_for_everyone()
    return summary
