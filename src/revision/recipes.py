"""What the pretrain and finetune stages share: the LM location, a fresh MLLM, the Accelerator, resume
fingerprints and loss summaries."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import pandas as pd
from accelerate import Accelerator

from revision.config import ModelConfig, TrainConfig
from revision.lm import lm_path, load_lm
from revision.mllm import MLLM, MLLMConfig, save_mllm
from revision.outputs import atomic_dir, atomic_file, fingerprint, write_json
from revision.samples import EmbeddingConversations, collate
from revision.train import LoopConfig, train
from revision.tracking import StageRun

def new_mllm(lm_dir: Path, model_cfg: ModelConfig, encoder: dict, max_length: int) -> MLLM:
    lm, tokenizer = load_lm(lm_path(lm_dir), trust_remote_code=model_cfg.trust_remote_code)
    config = MLLMConfig(
        embed_dim=encoder["dim"], visual_tokens=model_cfg.visual_tokens, encoder=encoder,
        system_prompt=model_cfg.system_prompt, max_length=max_length,
    )  # fmt: skip
    return MLLM(lm, tokenizer, config)


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    return Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision=cfg.mixed_precision)


def loss_summary(history: list[dict], window: int = 10) -> dict[str, float]:
    """Mean loss over the first and last ``window`` optimizer steps (single steps are noisy)."""
    if not history:
        return {"steps": 0}
    losses = [row["loss"] for row in history]
    window = max(1, min(window, len(losses) // 2))  # the two windows never overlap
    return {
        "steps": len(history),
        "loss_first": sum(losses[:window]) / len(losses[:window]),
        "loss_last": sum(losses[-window:]) / len(losses[-window:]),
    }


def write_loss_csv(path: Path, history: list[dict]) -> None:
    with atomic_file(path) as tmp:
        pd.DataFrame(history, columns=["step", "loss", "lr"]).to_csv(tmp, index=False)


def train_and_save(
    model: MLLM,
    samples: EmbeddingConversations | None,
    cfg: TrainConfig,
    accelerator: Accelerator,
    run: StageRun,
    run_id: str,
    checkpoints: Path,
    out: Path,
    metrics: Path,
    loss_plot: Path,
    rebuild: Callable[[], MLLM],
    extra: dict | None = None,
) -> dict:
    """Train (unless ``samples`` is None), then on the main process save the MLLM atomically, write the
    metrics and loss curve, and drop the checkpoints the finished run no longer needs.

    The saved weights are ``accelerator.get_state_dict``'s full copy loaded into ``rebuild()``, a fresh model
    of the same shape: under ZeRO-3 or FSDP the trained model only holds this process's shard."""
    history = []
    if samples is not None:
        loop = LoopConfig(cfg.seed, cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay, cfg.warmup_ratio, cfg.checkpoint_every)
        loss = lambda m, batch: m(batch[0], batch[1])  # noqa: E731
        model, history = train(model, samples, collate, loss, loop, accelerator, checkpoints, run_id, run.log_metrics)
    state = accelerator.get_state_dict(model)  # every process takes part: sharded weights are gathered here
    summary = {**(extra or {}), "samples": len(samples) if samples is not None else 0, **loss_summary(history)}
    run.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))})
    if accelerator.is_main_process:
        trained = rebuild()
        trained.load_state_dict(state)
        with atomic_dir(out) as tmp:
            save_mllm(trained, tmp)
        write_json(metrics, summary)
        write_loss_csv(loss_plot, history)
        shutil.rmtree(checkpoints, ignore_errors=True)
    accelerator.wait_for_everyone()
    return summary
