"""``revision encoder``: the frozen dual encoder every later stage uses."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
import typer

from revision.config import EncoderConfig, describe, load_stage_config, read_params
from revision.contrastive import train_heads
from revision.encoders import LitEncoder, batched, build_encoder, save_encoder
from revision.images import read_image
from revision.outputs import atomic_dir, atomic_file, write_json
from revision.tracking import stage_run
from revision.zeroshot import modality_gap, zero_shot_accuracy

NAME = "encoder"
HELP = (
    "Build the dual encoder. kind=lit (default) joins the bundled MiniLM text tower and EfficientNet-Lite0 "
    "image tower with projection heads trained contrastively on the encoder split; kind=open_clip or hf_clip "
    "loads a local CLIP checkpoint and trains nothing. Reports zero-shot accuracy on the eval images and the "
    "modality gap.\n\nParams read (params.yaml):\n\n" + describe(EncoderConfig, "encoder")
)


def image_reader(root: Path, manifest: str):
    """Batch function: manifest rows (index, path) -> PIL images, errors naming the row."""
    return lambda rows: [read_image(root / path, f"{root / manifest}: row {i}") for i, path in rows]


def main(
    params: Path = typer.Option(Path("params.yaml"), help="params file holding the 'encoder' block"),
    prepared: Path = typer.Option(Path("data/prepared"), help="manifests from `revision prepare`"),
    out: Path = typer.Option(Path("data/encoder"), help="output folder: encoder.json (+ heads.safetensors)"),
    metrics: Path = typer.Option(Path("reports/encoder.json"), help="DVC metrics file"),
    loss_plot: Path = typer.Option(Path("reports/encoder_loss.csv"), help="contrastive loss per epoch (DVC plot)"),
) -> None:
    cfg: EncoderConfig = load_stage_config(NAME, params)
    torch.manual_seed(cfg.seed)
    encoder = build_encoder(cfg)
    results: dict[str, float] = {}
    history: list[float] = []
    with stage_run(NAME, read_params(params)[NAME]) as run, atomic_dir(out) as tmp:
        if isinstance(encoder, LitEncoder):
            pairs = pd.read_parquet(prepared / "encoder_pairs.parquet")
            rows = list(enumerate(pairs["image"]))
            read = image_reader(prepared, "encoder_pairs.parquet")
            image_feats = batched(lambda r: encoder.image_tower(read(r)), rows, cfg.batch_size, "image features")
            text_feats = batched(encoder.text_tower, pairs["caption"].tolist(), cfg.batch_size, "text features")
            history = train_heads(encoder, text_feats, image_feats, cfg.lit, cfg.seed, run.log_metrics)
            if history:
                results.update(contrastive_loss_first=history[0], contrastive_loss_last=history[-1])
        identity = save_encoder(encoder, cfg, tmp)
        results.update(evaluate_encoder(encoder, prepared, cfg.batch_size))
        run.log_metrics(results)
    write_json(metrics, {"encoder": identity, **results})
    with atomic_file(loss_plot) as tmp_csv:
        pd.DataFrame({"epoch": range(len(history)), "contrastive_loss": history}).to_csv(tmp_csv, index=False)
    typer.echo(f"encoder {identity['id']} ({identity['name']}): " + ", ".join(f"{k}={v:.3f}" for k, v in results.items()))


def evaluate_encoder(encoder, prepared: Path, batch_size: int) -> dict[str, float]:
    """Zero-shot accuracy on the eval images and the gap between eval captions and their images."""
    table = pd.read_parquet(prepared / "eval.parquet")
    if table.empty:
        return {}
    read = image_reader(prepared, "eval.parquet")
    images = batched(lambda r: encoder.encode_images(read(r)), list(enumerate(table["image"])), batch_size, "eval").numpy()
    captions = [c[0] for c in table["captions"]]
    texts = batched(encoder.encode_text, captions, batch_size, quiet=True).numpy()
    encode = lambda prompts: encoder.encode_text(prompts).numpy()  # noqa: E731
    return {**zero_shot_accuracy(encode, images, table), "modality_gap": modality_gap(texts, images)}
