"""``revision embed``: every split through the frozen encoder, as sharded normalized embeddings."""

from __future__ import annotations

from pathlib import Path

import typer

from revision import layout
from revision.config import EmbedConfig, blocks_of, describe, load_stage_config
from revision.outputs import write_json
from revision.tracking import stage_run

NAME = "embed"
HELP = (
    "Embed the unpaired text corpus, the unpaired image pool and the images of every other split (plus the "
    "eval captions) with the frozen encoder: L2-normalized float32 safetensors shards with ids, recording the "
    "encoder's identity. Under several processes (params.yaml `launch`, e.g. `accelerate launch --config_file "
    "configs/accelerate/ddp.yaml -m stages`) each encodes whole batches and the output is identical to one "
    "process's. A killed run resumes from its last whole shard.\n\nParams read (params.yaml):\n\n" + describe(EmbedConfig, "embed")
)


def main(
    params: Path = typer.Option(Path("params.yaml"), help="params file holding the 'embed' block"),
    prepared: Path = typer.Option(layout.PREPARED, help="manifests from `revision prepare`"),
    encoder_dir: Path = typer.Option(layout.ENCODER, help="encoder from `revision encoder`"),
    out: Path = typer.Option(layout.EMBEDDINGS, help="output folder, one embedding set per subfolder"),
    metrics: Path = typer.Option(layout.stage_metrics(NAME), help="DVC metrics file"),
) -> None:
    from accelerate import Accelerator

    from revision.embedding_jobs import embed_into, jobs_from_manifests
    from revision.encoders import load_encoder

    cfg: EmbedConfig = load_stage_config(NAME, params)
    accelerator = Accelerator()
    encoder, identity = load_encoder(encoder_dir)
    encoder.to(accelerator.device)
    jobs = jobs_from_manifests(prepared)
    with stage_run(NAME, blocks_of(params, NAME), accelerator.is_main_process) as run:
        rows = embed_into(out, encoder, identity, jobs, cfg.batch_size, cfg.shard_size, accelerator, run, cfg.stress_shift)
    if accelerator.is_main_process:  # throughput goes to MLflow only: the DVC metrics stay identical run to run
        write_json(metrics, {"encoder": identity, "stress_shift": cfg.stress_shift, **rows})
        typer.echo("embed: " + ", ".join(f"{j.name}={len(j.ids)}" for j in jobs))

