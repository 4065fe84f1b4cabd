"""``revision realign``: map text embeddings into the image embedding distribution, and report the gap."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from revision import layout
from revision.config import RealignConfig, Strict, blocks_of, describe, load_stage_config, read_params
from revision.errors import InputError
from revision.outputs import atomic_dir, write_json
from revision.tracking import stage_run

if TYPE_CHECKING:  # imported where used: `revision --help` stays fast
    from revision.realign import Recipe

NAME = "realign"
PIPELINE_SETS = (layout.TEXT, layout.IMAGE_POOL_IMAGES, layout.EVAL_TEXT, layout.EVAL_IMAGES)
# A standalone run's settings where --params has no realign block (a run on the user's own files, outside the
# project): the paper's full ReAlign recipe in 1024-row chunks. Not a pipeline param: the pipeline mode reads
# params.yaml only, and the realign block of --params, where there is one, overrides these.
STANDALONE = {"method": "realign", "anchor": True, "trace": True, "centroid": True, "noise_std": 0.1, "seed": 0,
              "shrinkage": 0.1, "chunk_rows": 1024}
HELP = (
    "Fit ReAlign (or an alternative: none, mean_shift, c3, block_cov) on unpaired text and image embeddings "
    "and write the aligned text embeddings, the fitted stats and a modality-gap report.\n\n"
    "Pipeline mode (no file options): reads data/embeddings/{text,image_pool,eval_text,eval_images} and the "
    "labels in data/prepared; writes data/realign/ (stats.json, aligned_text/) and reports/realign/ "
    "(metrics.json, PNG plots); logs to MLflow.\n\n"
    "Standalone: --text-embeddings T --image-embeddings I --output-dir D fits on your own files (.npy, "
    ".safetensors, .parquet or an embedding directory) and writes D/aligned_text.npy (same row order) and "
    "D/stats.json. --apply D/stats.json --text-embeddings T2 --output-dir D2 applies fitted stats to new text "
    "without refitting. Standalone settings (the full ReAlign recipe): "
    + ", ".join(f"{key}={str(value).lower() if isinstance(value, bool) else value}" for key, value in STANDALONE.items())
    + "; overridden by the realign block of --params if there is one, then by the options.\n\nParams read "
    "(params.yaml):\n\n" + describe(RealignConfig, "realign")
)


def main(
    params: Path = typer.Option(Path("params.yaml"), help="params file holding the 'realign' block"),
    text_embeddings: Optional[Path] = typer.Option(None, help="standalone: text embeddings to align"),
    image_embeddings: Optional[Path] = typer.Option(None, help="standalone: image embeddings to fit on"),
    output_dir: Optional[Path] = typer.Option(None, help="standalone: folder for aligned_text.npy + stats.json"),
    apply: Optional[Path] = typer.Option(None, help="standalone: a fitted stats.json to apply, no refit"),
    method: Optional[str] = typer.Option(None, help="standalone override of realign.method"),
    anchor: Optional[bool] = typer.Option(None, "--anchor/--no-anchor", help="standalone override"),
    trace: Optional[bool] = typer.Option(None, "--trace/--no-trace", help="standalone override"),
    centroid: Optional[bool] = typer.Option(None, "--centroid/--no-centroid", help="standalone override"),
    noise_std: Optional[float] = typer.Option(None, help="standalone override of realign.noise_std"),
    seed: Optional[int] = typer.Option(None, help="standalone override of realign.seed"),
    shrinkage: Optional[float] = typer.Option(None, help="standalone override of realign.shrinkage"),
    chunk_rows: Optional[int] = typer.Option(None, help="standalone override of realign.chunk_rows"),
    embeddings: Path = typer.Option(layout.EMBEDDINGS, help="pipeline: folder of embedding sets"),
    prepared: Path = typer.Option(layout.PREPARED, help="pipeline: manifests holding the probe's labels"),
    out: Path = typer.Option(layout.REALIGN, help="pipeline: output folder (replaced atomically)"),
    reports: Path = typer.Option(layout.REALIGN_REPORTS, help="pipeline: report folder (replaced atomically)"),
) -> None:
    from revision.gap import centroid_gap
    from revision.realign import apply_files, fit_files

    settings = {"method": method, "anchor": anchor, "trace": trace, "centroid": centroid,
                "noise_std": noise_std, "seed": seed, "shrinkage": shrinkage}
    settings = {k: v for k, v in settings.items() if v is not None}
    chunking = {"chunk_rows": chunk_rows} if chunk_rows is not None else {}
    if text_embeddings is None:
        if any(v is not None for v in (image_embeddings, output_dir, apply)) or settings or chunking:
            raise InputError("--text-embeddings is required with the standalone options; the pipeline mode "
                             "takes its settings from params.yaml (realign.*)")
        return run_pipeline(params, embeddings, prepared, out, reports)
    if output_dir is None:
        raise InputError("--output-dir is required with --text-embeddings")
    recipe, rows = standalone_config(params, {**settings, **chunking})
    if apply is not None:
        if image_embeddings is not None or settings:
            raise InputError("--apply uses the fitted stats as they are: drop --image-embeddings and method options")
        stats, moments = apply_files(apply, text_embeddings, output_dir, rows)
    elif image_embeddings is None:
        raise InputError("--image-embeddings is required to fit (or pass --apply STATS.json)")
    else:
        stats, moments = fit_files(text_embeddings, image_embeddings, output_dir, recipe, rows)
    gap_before, gap_after = centroid_gap(stats.mu_txt, stats.mu_img), centroid_gap(moments.mean, stats.mu_img)
    typer.echo(f"realign: {stats.recipe.method} on {moments.count} text rows; wrote {output_dir}/aligned_text.npy "
               f"and stats.json; centroid gap {gap_before:.4f} -> {gap_after:.4f}")


def standalone_config(params: Path, overrides: dict) -> tuple[Recipe, int]:
    """The recipe and chunk size of a standalone run: ``STANDALONE``, overridden by the params file's realign
    block where it has one, then by the command line."""
    from pydantic import ValidationError, create_model

    from revision.realign import recipe_from

    settings = dict(STANDALONE)
    block = read_params(params).get(NAME) if params.exists() else None
    settings.update(block or {})
    fields = {name: (field.annotation, field) for name, field in RealignConfig.model_fields.items() if name in settings}
    unknown = sorted(set(settings) - set(fields))
    if unknown:
        raise InputError(f"{params}: unknown key(s) realign.{', realign.'.join(unknown)}")
    try:
        cfg = create_model("StandaloneRealign", __base__=Strict, **fields).model_validate({**settings, **overrides})
    except ValidationError as err:
        problems = "; ".join(f"--{str(e['loc'][0]).replace('_', '-')}: {e['msg']}" for e in err.errors())
        raise InputError(problems) from None
    return recipe_from(cfg), cfg.chunk_rows


def run_pipeline(params: Path, embeddings: Path, prepared: Path, out: Path, reports: Path) -> None:
    from revision.embedding_streams import ProjectSetSource
    from revision.gap import check_paired, flat_metrics, json_safe, layout_report_inputs, realign_report
    from revision.realign import align_to_embedding_set, check_encoders, fit, recipe_from, save_stats

    cfg = load_stage_config(NAME, params)
    sets = {spec.name: ProjectSetSource(embeddings / spec.name) for spec in PIPELINE_SETS}
    text, images = sets[layout.TEXT.name], sets[layout.IMAGE_POOL_IMAGES.name]
    for other in list(sets.values())[1:]:
        check_encoders(text, other)
    check_paired(sets[layout.EVAL_TEXT.name], sets[layout.EVAL_IMAGES.name])
    with stage_run(NAME, blocks_of(params, NAME)) as run:
        # both folders are renamed into place only once the aligned set and the whole report are done
        with atomic_dir(out) as data_tmp, atomic_dir(reports) as report_tmp:
            stats = fit(text, images, recipe_from(cfg), cfg.chunk_rows)
            moments = align_to_embedding_set(text, stats, data_tmp / layout.ALIGNED_TEXT, cfg.chunk_rows)
            save_stats(stats, data_tmp)
            sets[layout.ALIGNED_TEXT] = ProjectSetSource(data_tmp / layout.ALIGNED_TEXT)
            inputs = layout_report_inputs(
                stats, moments, sets, prepared, cfg.report_sample, cfg.probe_max_rows, cfg.seed, cfg.chunk_rows
            )
            report = realign_report(stats, inputs, cfg.report_k, cfg.seed, report_tmp)
            write_json(report_tmp / "metrics.json", json_safe(report))
        run.log_metrics(flat_metrics(report))
        run.log_artifact(out / "stats.json")
        run.log_artifact(reports, "reports")
    before, after = report["before"]["centroid_gap"], report["after"]["centroid_gap"]
    typer.echo(f"realign: {cfg.method} on {stats.counts['text']} text / {stats.counts['image']} image rows; "
               f"centroid gap {before:.4f} -> {after:.4f}; wrote {out} and {reports}")
