"""``revision prepare``: bundled (and user) data into disjoint split manifests."""

from __future__ import annotations

from pathlib import Path

import typer

from revision import layout
from revision.config import PrepareConfig, blocks_of, describe, load_stage_config
from revision.outputs import atomic_dir, write_json
from revision.tracking import stage_run

NAME = "prepare"
HELP = (
    "Turn the bundled easy-VQA and Fashion-MNIST data (and optionally your own LLaVA JSON / ReVision "
    "dataset.json) into disjoint splits: encoder pairs, unpaired text corpus, unpaired image pool, paired "
    "pretrain split, SFT conversations and an eval set.\n\nParams read (params.yaml):\n\n"
    + describe(PrepareConfig, "prepare")
)


def main(
    params: Path = typer.Option(Path("params.yaml"), help="params file holding the 'prepare' block"),
    out: Path = typer.Option(layout.PREPARED, help="output folder (replaced atomically)"),
    metrics: Path = typer.Option(layout.stage_metrics(NAME), help="split sizes as a DVC metrics file"),
) -> None:
    from revision.prepare import distinct_corpus_texts, prepare

    cfg = load_stage_config(NAME, params)
    with stage_run(NAME, blocks_of(params, NAME)) as run, atomic_dir(out) as tmp:
        counts = prepare(cfg, tmp)
        distinct = distinct_corpus_texts(tmp)
        run.log_metrics({f"rows_{k}": v for k, v in counts.items()} | {"distinct_captions": distinct})
    write_json(metrics, {"rows": counts, "distinct_captions": distinct})
    typer.echo(f"prepare: wrote {out} " + ", ".join(f"{k}={v}" for k, v in counts.items()) + f"; {distinct} distinct captions")
