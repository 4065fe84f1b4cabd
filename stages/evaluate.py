"""``revision evaluate``: score MLLM checkpoints on the held-out eval set."""

from __future__ import annotations

import json
import math
from pathlib import Path

import typer

from revision import layout
from revision.config import EvaluateConfig, blocks_of, describe, load_stage_config
from revision.errors import InputError
from revision.outputs import atomic_dir, write_json
from revision.tracking import stage_run

NAME = "evaluate"
HELP = (
    "Score MLLM checkpoints (by default stage 1 alone, i.e. zero-shot on images, and after stage 2) on the "
    "held-out eval images: a generated caption per image against the references (BLEU-4, METEOR, ROUGE-L, "
    "CIDEr) and their per-token NLL, VQA exact match per question type, POPE shape-existence probes on "
    "easy-VQA, the Fashion-MNIST class the caption names, and what the model reads from the image: image_gain "
    "(caption NLL with another image minus with its own) and two-way ranked probes (the reference caption vs the "
    "same caption with its garment, colour or shape swapped). Writes metrics per checkpoint and one JSONL of "
    "predictions per checkpoint.\n\nParams read (params.yaml):\n\n" + describe(EvaluateConfig, "evaluate")
)
SUMMARY_COLUMNS = ("cider", "bleu4", "meteor", "rouge_l", "caption_nll", "vqa_acc", "pope_f1", "garment_acc")


def checkpoint_names(checkpoints: list[Path]) -> list[str]:
    names = [checkpoint.resolve().name for checkpoint in checkpoints]
    if not names:
        raise InputError("no checkpoints to evaluate")
    if len(set(names)) != len(names):
        raise InputError(f"checkpoints must have distinct folder names, got {names}")
    return names


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")


def inside(path: Path, folder: Path) -> Path | None:
    """``path`` relative to ``folder`` when it lies inside it."""
    try:
        return path.resolve().relative_to(folder.resolve())
    except ValueError:
        return None


def summary_table(results: dict[str, dict[str, float]]) -> str:
    width = max(len("checkpoint"), *map(len, results))
    lines = ["checkpoint".ljust(width) + "".join(f"{column:>12}" for column in SUMMARY_COLUMNS)]
    for name, scores in results.items():
        cells = (f"{scores[c]:>12.4f}" if scores.get(c) is not None else f"{'-':>12}" for c in SUMMARY_COLUMNS)
        lines.append(name.ljust(width) + "".join(cells))
    return "\n".join(lines)


def main(
    params: Path = typer.Option(Path("params.yaml"), help="params file holding the 'evaluate' block"),
    prepared: Path = typer.Option(layout.PREPARED, help="manifests (eval.parquet)"),
    embeddings: Path = typer.Option(layout.EMBEDDINGS, help="embedding sets (eval_images)"),
    visual: Path = typer.Option(layout.VISUAL, help="grid features or pixels (eval_images) for grid or pixels models"),
    checkpoints: list[Path] = typer.Option(
        [layout.PRETRAIN, layout.FINETUNE],
        help="MLLM folders to score, each named by its folder name (repeat the option for several)",
    ),
    metrics: Path = typer.Option(
        layout.EVALUATE_METRICS, help="DVC metrics file: {checkpoint name: {metric: value}}"
    ),
    predictions: Path = typer.Option(
        layout.EVALUATE_REPORTS, help="folder (replaced as a whole) of <checkpoint name>.jsonl prediction rows"
    ),
) -> None:
    from revision.checkpoints import checkpoint_config, load_mllm
    from revision.evaluate import CaptionScorer, check_checkpoint_encoder, evaluate_model, load_eval_set
    from revision.precision import autocast, default_device, resolve

    cfg: EvaluateConfig = load_stage_config(NAME, params)
    names = checkpoint_names(checkpoints)
    by_input, eval_sets = {}, []  # the same images and questions, as pooled embeddings or grid features
    for checkpoint in checkpoints:
        images = checkpoint_config(checkpoint).visual.rows(embeddings, visual, layout.EVAL_IMAGES.name)
        check_checkpoint_encoder(checkpoint, images)
        if images.dir not in by_input:
            by_input[images.dir] = load_eval_set(prepared, images, cfg)
        eval_sets.append(by_input[images.dir])
    metrics_inside = inside(metrics, predictions)
    device = default_device()
    precision = resolve(cfg.mixed_precision, device)
    results: dict[str, dict[str, float | str | None]] = {}
    with stage_run(NAME, blocks_of(params, NAME)) as run:
        run.log_params({"precision": precision})
        with CaptionScorer() as scorer, atomic_dir(predictions) as tmp:
            for name, checkpoint, eval_set in zip(names, checkpoints, eval_sets):
                model = load_mllm(checkpoint, device)
                with autocast(precision, device):
                    scores, rows = evaluate_model(model, eval_set, cfg, scorer)
                # a standard error needs two items: with fewer it is null in the metrics and not logged
                results[name] = {**{k: None if math.isnan(v) else v for k, v in scores.items()}, "precision": precision}
                write_jsonl(tmp / f"{name}.jsonl", rows)
                run.log_metrics({f"{name}/{key}": value for key, value in scores.items() if not math.isnan(value)})
            if metrics_inside is not None:
                write_json(tmp / metrics_inside, results)
        if metrics_inside is None:
            write_json(metrics, results)
        run.log_artifact(predictions, "evaluate")
    typer.echo(summary_table(results))
