"""MLLM checkpoints on disk: what was trained, not the frozen LM it ran on.

A checkpoint folder holds ``projector.safetensors``, ``mllm.json`` (the config: the visual input and its
geometry, the identity of the encoder whose rows the projector reads and of the base LM, its folder and a digest
of its files), and for the LM only what changed: nothing (stage 1, LM frozen), ``adapter/`` (peft LoRA weights)
or ``lm/`` (a fully trained LM, or a model with no recorded base). Loading rebuilds the whole model and refuses a
base LM that is missing or not the one the checkpoint was trained on. ``export_mllm`` writes a self-contained
folder (``lm/`` with LoRA merged in).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn

from revision.errors import InputError
from revision.lm import load_lm
from revision.mllm import MLLM, MLLMConfig
from revision.outputs import tree_digest

LM_DIR = "lm"
ADAPTER_DIR = "adapter"
PROJECTOR_FILE = "projector.safetensors"
CONFIG_FILE = "mllm.json"


def trained_lm_part(model: MLLM) -> str:
    """What of the LM training changed: ``adapter`` (LoRA), ``full`` (any base weight trainable) or ``none``."""
    if isinstance(model.lm, PeftModel):
        return "adapter"
    return "full" if any(p.requires_grad for p in model.lm.parameters()) else "none"


def save_mllm(model: MLLM, out_dir: str | Path, self_contained: bool = False) -> Path:
    """The projector, mllm.json and what of the LM was trained (see the module docstring). A model with no
    recorded base LM, or ``self_contained``, gets the whole LM (LoRA merged in) under ``lm/``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    part = trained_lm_part(model)
    if self_contained or model.config.base_lm is None or part == "full":
        _plain_lm(model.lm).save_pretrained(out_dir / LM_DIR, safe_serialization=True)
        model.tokenizer.save_pretrained(out_dir / LM_DIR)
    elif part == "adapter":
        model.lm.save_pretrained(out_dir / ADAPTER_DIR, safe_serialization=True)
        _record_base_path(out_dir / ADAPTER_DIR, model.config.base_lm["path"])
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in model.projector.state_dict().items()}
    save_file(state, str(out_dir / PROJECTOR_FILE))
    config = {**model.config.to_dict(), "hidden_size": model.projector.hidden_size}
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def checkpoint_config(checkpoint: Path) -> MLLMConfig:
    """A checkpoint's mllm.json, read without loading the model (so a mismatch fails before any is loaded)."""
    return MLLMConfig.from_dict(_config_values(checkpoint))


def _config_values(checkpoint: Path) -> dict:
    config_path = checkpoint / CONFIG_FILE
    if not config_path.is_file():
        raise InputError(f"{checkpoint} is not an MLLM folder (no {CONFIG_FILE})")
    return json.loads(config_path.read_text())


def load_mllm(path: str | Path, device: str | torch.device = "cpu") -> MLLM:
    """The whole model a checkpoint describes: its own ``lm/``, or its base LM (checked against the recorded
    digest) with the ``adapter/`` merged in when there is one."""
    path = Path(path)
    values = _config_values(path)
    config = MLLMConfig.from_dict(values)
    if (path / LM_DIR).is_dir():
        lm, tokenizer = load_lm(path / LM_DIR)
    else:
        lm, tokenizer = load_lm(_base_lm_folder(path, config.base_lm))
        if (path / ADAPTER_DIR).is_dir():
            lm = PeftModel.from_pretrained(lm, path / ADAPTER_DIR).merge_and_unload()
            config.base_lm = None  # no longer the recorded base: saved again, this LM is written whole
    projector = config.visual.projector(values["hidden_size"])
    projector.load_state_dict(load_file(str(path / PROJECTOR_FILE)))
    return MLLM(lm.to(device), tokenizer, config, projector)


def export_mllm(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """A self-contained copy of ``checkpoint``: the whole LM (LoRA merged) under ``lm/``, no base LM needed."""
    return save_mllm(load_mllm(checkpoint), out_dir, self_contained=True)


def _record_base_path(adapter_dir: Path, base_path: str) -> None:
    # peft records where the LM was loaded from (an absolute path of this checkout, when read beside a
    # checkpoint) in its config and in a generated model card, and lists the target modules in set order; the
    # base as the checkpoint records it and a sorted list keep the saved bytes the same wherever the stage ran
    config = adapter_dir / "adapter_config.json"
    values = json.loads(config.read_text())
    values["base_model_name_or_path"] = base_path
    if isinstance(values.get("target_modules"), list):  # peft keeps a set: its order follows the hash seed
        values["target_modules"] = sorted(values["target_modules"])
    config.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
    (adapter_dir / "README.md").unlink(missing_ok=True)


def _base_lm_folder(checkpoint: Path, base: dict | None) -> Path:
    if not base:
        raise InputError(f"{checkpoint}: has neither {LM_DIR}/ nor a recorded base LM in {CONFIG_FILE}")
    folder = Path(base["path"])
    if not folder.is_absolute():  # data/lm as a stage saw it: that of the checkout holding the checkpoint first
        folder = next((root / folder for root in checkpoint.resolve().parents if (root / folder).is_dir()), folder)
    if not folder.is_dir():
        raise InputError(f"{checkpoint}: its base LM {folder} is missing; run `revision lm` (or `dvc pull`) to "
                         f"rebuild it, or `revision export` the checkpoint where the base LM is")
    if tree_digest(folder) != base["digest"]:
        raise InputError(f"{checkpoint}: the LM at {folder} is not the one it was trained on (its files differ "
                         f"from digest {base['digest'][:12]}); re-run the training stages on this LM")
    return folder


def _plain_lm(lm: nn.Module) -> nn.Module:
    # A LoRA-wrapped LM is saved with its adapters merged, so loading needs no peft. Merging a copy leaves the
    # model being trained untouched (at the cost of one LM copy in memory while saving).
    if isinstance(lm, PeftModel):
        return copy.deepcopy(lm).merge_and_unload()
    return lm
