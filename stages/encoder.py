"""``revision encoder``: the frozen dual encoder every later stage uses."""

from __future__ import annotations

from pathlib import Path

import typer

from revision import layout
from revision.config import EncoderConfig, blocks_of, describe, load_stage_config
from revision.outputs import atomic_dir, atomic_file, write_json
from revision.tracking import stage_run

NAME = "encoder"
HELP = (
    "Build the dual encoder. kind=lit (default) joins the bundled MiniLM text tower and EfficientNet-Lite0 "
    "image tower with projection heads trained contrastively on the encoder split; kind=open_clip or hf_clip "
    "loads a local CLIP checkpoint and trains nothing. Reports zero-shot accuracy on the eval images and the "
    "modality gap.\n\nParams read (params.yaml):\n\n" + describe(EncoderConfig, "encoder")
)


def main(
    params: Path = typer.Option(Path("params.yaml"), help="params file holding the 'encoder' block"),
    prepared: Path = typer.Option(layout.PREPARED, help="manifests from `revision prepare`"),
    out: Path = typer.Option(layout.ENCODER, help="output folder: encoder.json (+ heads.safetensors)"),
    metrics: Path = typer.Option(layout.stage_metrics(NAME), help="DVC metrics file"),
    loss_plot: Path = typer.Option(layout.loss_curve(NAME), help="contrastive loss per epoch (DVC plot)"),
) -> None:
    import pandas as pd
    import torch

    from revision.contrastive import fit_lit_heads
    from revision.encoders import LitEncoder, build_encoder, save_encoder
    from revision.zeroshot import evaluate_encoder

    cfg: EncoderConfig = load_stage_config(NAME, params)
    torch.manual_seed(cfg.seed)
    encoder = build_encoder(cfg)
    results: dict[str, float] = {}
    history: list[float] = []
    with stage_run(NAME, blocks_of(params, NAME)) as run, atomic_dir(out) as tmp:
        if isinstance(encoder, LitEncoder):
            history, gaps = fit_lit_heads(encoder, prepared, cfg, run.log_metrics)
            if history:
                results.update(contrastive_loss_first=history[0], contrastive_loss_last=history[-1])
            results.update(gaps)
        identity = save_encoder(encoder, cfg, tmp)
        results.update(evaluate_encoder(encoder, prepared, cfg.batch_size))
        run.log_metrics(results)
    write_json(metrics, {"encoder": identity, **results})
    with atomic_file(loss_plot) as tmp_csv:
        pd.DataFrame({"epoch": range(len(history)), "contrastive_loss": history}).to_csv(tmp_csv, index=False)
    typer.echo(f"encoder {identity['id']} ({identity['name']}): " + ", ".join(f"{k}={v:.3f}" for k, v in results.items()))
