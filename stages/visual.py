"""``revision visual``: the images as a grid or pixels MLLM reads them (``model.visual_input: grid | pixels``)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from revision import layout
from revision.config import EmbedConfig, ModelConfig, describe, load_stage_config, read_params
from revision.outputs import atomic_dir, write_json
from revision.tracking import stage_run

NAME = "visual"
HELP = (
    "With model.visual_input: grid, write the per-location features of the image tower (its last feature map, "
    "average-pooled to model.grid x model.grid cells) for the images the MLLM stages read: pretrain_images, "
    "sft_images, eval_images, in the embedding format with the encoder's identity and the cell count. With "
    "pixels input (VoRA) it writes the same images as rows of pixels at vora.image_size, no encoder involved. "
    "With pooled input (ReVision's) it writes only a record that there is nothing to write. Batches, shards, "
    "processes and resuming as in `revision embed`.\n\nParams read (params.yaml): model.visual_input, "
    "model.grid, vora.image_size, embed.batch_size, embed.shard_size\n\n" + describe(ModelConfig, "model")
)


def main(
    params: Path = typer.Option(Path("params.yaml"), help="params file holding the 'model' and 'embed' blocks"),
    prepared: Path = typer.Option(layout.PREPARED, help="manifests from `revision prepare`"),
    encoder_dir: Path = typer.Option(layout.ENCODER, help="encoder from `revision encoder`"),
    out: Path = typer.Option(layout.VISUAL, help="output folder, one set of rows per subfolder"),
    metrics: Path = typer.Option(layout.stage_metrics(NAME), help="DVC metrics file"),
) -> None:
    from accelerate import Accelerator

    from revision.embedding_jobs import embed_into, jobs_from_manifests
    from revision.visual_input import stage_rows

    model_cfg: ModelConfig = load_stage_config("model", params)
    embed_cfg: EmbedConfig = load_stage_config("embed", params)
    accelerator = Accelerator()
    vora = load_stage_config("vora", params)
    reader, identity, record = stage_rows(model_cfg, vora, encoder_dir, accelerator.device)
    if reader is None:
        with atomic_dir(out) as tmp:
            (tmp / layout.VISUAL_RECORD).write_text(json.dumps(record) + "\n")
        write_json(metrics, record)
        typer.echo(f"visual: {model_cfg.visual_input} visual input, no rows to write")
        return
    jobs = jobs_from_manifests(prepared, layout.VISUAL_SETS)
    blocks = {"model": read_params(params)["model"], "embed": {k: embed_cfg.model_dump()[k] for k in ("batch_size", "shard_size")}}
    records = {layout.VISUAL_RECORD: json.dumps(record, indent=1) + "\n"}
    with stage_run(NAME, blocks, accelerator.is_main_process) as run:
        rows = embed_into(out, reader, identity, jobs, embed_cfg.batch_size, embed_cfg.shard_size, accelerator, run, records=records)
    if accelerator.is_main_process:
        write_json(metrics, record | rows)
        sizes = ", ".join(f"{j.name}={len(j.ids)}" for j in jobs)
        typer.echo(f"visual: {json.dumps({k: v for k, v in record.items() if k != 'encoder'})}; {sizes}")
