"""``revision pretrain``: stage 1, the projector learns to turn (aligned) text embeddings into visual tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import typer
from accelerate.utils import set_seed

from revision.config import ModelConfig, PretrainConfig, describe, load_stage_config, read_params
from revision.embeddings import EmbeddingSet
from revision.mllm import freeze_lm
from revision.outputs import fingerprint
from revision.recipes import make_accelerator, new_mllm, train_and_save
from revision.samples import EmbeddingConversations, caption_samples
from revision.tracking import stage_run

NAME = "pretrain"
HELP = (
    "Stage 1 (modality-substitution pretraining): the LM stays frozen and the projector learns to map one "
    "embedding to visual prefix tokens whose answer is the text the embedding came from. pretrain.source picks "
    "the input: aligned (ReVision), raw text embeddings, paired real images + captions, or none.\n\n"
    "Params read (params.yaml):\n\n" + describe(PretrainConfig, "pretrain") + "\n\n" + describe(ModelConfig, "model")
)


def stage1_samples(cfg: PretrainConfig, prepared: Path, embeddings: Path, realign: Path) -> tuple[EmbeddingConversations | None, dict]:
    """The (embedding, caption conversation) pairs for ``cfg.source`` and the encoder they come from."""
    if cfg.source == "paired":
        emb, manifest, column = EmbeddingSet(embeddings / "pretrain_images"), prepared / "pretrain_pairs.parquet", "caption"
    else:
        text_dir = realign / "aligned_text" if cfg.source == "aligned" else embeddings / "text"
        emb, manifest, column = EmbeddingSet(text_dir), prepared / "text_corpus.parquet", "text"
    if cfg.source == "none":
        return None, emb.encoder
    samples = caption_samples(emb, pd.read_parquet(manifest), column, manifest, cfg.max_samples, cfg.seed)
    return samples, emb.encoder


def main(
    params: Path = typer.Option(Path("params.yaml"), help="params file holding the 'pretrain' and 'model' blocks"),
    prepared: Path = typer.Option(Path("data/prepared"), help="manifests (caption texts)"),
    embeddings: Path = typer.Option(Path("data/embeddings"), help="embedding sets (raw text, paired images)"),
    realign: Path = typer.Option(Path("data/realign"), help="realign output (aligned text)"),
    lm_dir: Path = typer.Option(Path("data/lm"), help="LM from `revision lm`"),
    out: Path = typer.Option(Path("data/pretrain"), help="output MLLM folder"),
    checkpoints: Path = typer.Option(Path("data/checkpoints/pretrain"), help="resumable training state"),
    metrics: Path = typer.Option(Path("reports/pretrain.json"), help="DVC metrics file"),
    loss_plot: Path = typer.Option(Path("reports/pretrain_loss.csv"), help="per-step loss and lr (DVC plot)"),
) -> None:
    cfg: PretrainConfig = load_stage_config(NAME, params)
    model_cfg: ModelConfig = load_stage_config("model", params)
    accelerator = make_accelerator(cfg)
    set_seed(model_cfg.seed)
    samples, encoder = stage1_samples(cfg, prepared, embeddings, realign)
    build = lambda: freeze_lm(new_mllm(lm_dir, model_cfg, encoder, cfg.max_length))  # noqa: E731
    model = build()
    blocks = read_params(params)
    with stage_run(NAME, {NAME: blocks[NAME], "model": blocks["model"]}, accelerator.is_main_process) as run:
        run_id = fingerprint(cfg.model_dump(), model_cfg.model_dump(), encoder, samples.digest() if samples else None)
        outputs = (checkpoints, out, metrics, loss_plot, build, {"source": cfg.source})
        summary = train_and_save(model, samples, cfg, accelerator, run, run_id, *outputs)
    typer.echo(f"pretrain ({cfg.source}): " + json.dumps(summary))
