"""``revision study``: the ablation study's experiments (conditions × seeds) as queued DVC experiments, then
reports/ablation.md from them."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Optional

import typer

from revision.config import StudyConfig, describe, flatten, read_params, validate_block
from revision.errors import InputError
from revision.outputs import write_json
from revision.study import CONDITIONS, EXISTENCE_CONDITIONS, STRESS_CONDITIONS, World, queue_command, study_experiments
from revision.tracking import create_store

NAME = "study"
HELP = (
    "Run the ablation study: queue one DVC experiment per condition (stage 1 on nothing, paired images, raw "
    "text, or text aligned by mean shift, C3, ReAlign anchor only / anchor+trace / full; paired images as grid "
    "tokens; paired (pooled and grid) and full ReAlign again with Ross's reconstruction loss; VoRA's encoder-free "
    "path) and seed, plus the alignment conditions again under the modality-gap stress (embed.stress_shift), and "
    "the grid-token, Ross and VoRA conditions again with POPE-style existence questions in the SFT mix "
    "(prepare.existence_questions), all with the sizes of "
    "profiles/study.yaml; run the queue (`dvc exp run --run-all`), then write reports/ablation.md from "
    "`dvc exp show --json`. MLflow runs of all experiments go to one store (MLFLOW_TRACKING_URI, by default "
    "this folder's mlflow.db). Not a DVC stage: it drives DVC.\n\nSettings read (the study block of --profile; "
    "the options of the same names override them):\n\n" + describe(StudyConfig, "study")
)


def main(
    seeds: Optional[int] = typer.Option(None, min=1, help="override of study.seeds"),
    stress_shift: Optional[float] = typer.Option(None, min=0.0, help="override of study.stress_shift"),
    profile: Path = typer.Option(
        Path("profiles/study.yaml"), help="the study's settings (its study block) and the sizes every experiment runs with (the others)"
    ),
    conditions: str = typer.Option(",".join(CONDITIONS), help="conditions of the plain world, comma-separated"),
    stress_conditions: str = typer.Option(",".join(STRESS_CONDITIONS), help="conditions of the stress world"),
    existence_questions: Optional[int] = typer.Option(None, min=0, help="override of study.existence_questions"),
    existence_conditions: str = typer.Option(",".join(EXISTENCE_CONDITIONS), help="conditions of the existence world"),
    jobs: Optional[int] = typer.Option(None, min=1, help="override of study.jobs"),
    skip_done: bool = typer.Option(
        False, help="leave out the experiments that already have results (--results or `dvc exp show`): go on with a study run in parts"
    ),
    report_only: bool = typer.Option(False, help="only write the report from the experiments there are"),
    report: Path = typer.Option(Path("reports/ablation.md"), help="the generated report"),
    results: Path = typer.Option(
        Path("reports/study_results.json"), help="every study result so far (merged with `dvc exp show`; delete to start over)"
    ),
    run_record: Path = typer.Option(Path("reports/study_run.json"), help="wall time and size of every study run"),
) -> None:
    failed: list[str] = []
    if not report_only:
        if not profile.is_file():
            raise InputError(f"{profile}: no such study profile")
        overrides = {"seeds": seeds, "stress_shift": stress_shift, "existence_questions": existence_questions, "jobs": jobs}
        cfg, sizes = read_profile(profile, overrides)
        worlds = [World("", 0, tuple(_names(conditions)))]
        worlds += [World("stress", cfg.stress_shift, tuple(_names(stress_conditions)))] if cfg.stress_shift else []
        worlds += [World("existence", cfg.existence_questions, tuple(_names(existence_conditions)))] if cfg.existence_questions else []
        try:
            experiments = study_experiments(range(cfg.seeds), sizes, worlds)
        except ValueError as error:
            raise InputError(str(error)) from error
        if skip_done:
            from revision.study import pending

            experiments = pending(experiments, finished_results(results)[0])
        if not experiments:
            typer.echo("study: every experiment asked for has results already")
            write_report(report, run_record, results)
            return
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri()
        create_store(os.environ["MLFLOW_TRACKING_URI"])
        for experiment in experiments:
            subprocess.run(queue_command(experiment), check=True, stdout=subprocess.DEVNULL)
        typer.echo(f"study: queued {len(experiments)} experiments; running them one after another")
        start, started = time.perf_counter(), time.strftime("%Y-%m-%dT%H:%M:%S")
        finished = subprocess.run(["dvc", "exp", "run", "--run-all", "--jobs", str(cfg.jobs)])
        wall = time.perf_counter() - start
        done = {result.name for result in finished_results(results)[0]}
        failed = [experiment.name for experiment in experiments if experiment.name not in done]
        runs = read_runs(run_record) + [{
            "started": started, "experiments": len(experiments), "seeds": cfg.seeds, "stress_shift": cfg.stress_shift,
            "conditions": list(worlds[0].conditions), "existence_questions": cfg.existence_questions, "jobs": cfg.jobs,
            **{f"{world.name}_conditions": list(world.conditions) for world in worlds[1:]},
            "wall_s": round(wall, 1), "dvc_exit_code": finished.returncode, "without_result": failed,
        }]
        write_json(run_record, {"runs": runs})
        typer.echo(f"study: the queue ran for {wall / 60:.1f} min (dvc exit code {finished.returncode})")
    write_report(report, run_record, results)
    if failed:  # `dvc exp run --run-all` exits 0 when its experiments fail
        raise InputError(
            f"{len(failed)} of {len(experiments)} experiments have no result: {', '.join(failed)}; "
            f"`dvc queue status` and `dvc queue logs <name>` say why, `--skip-done` runs them again"
        )


def read_profile(profile: Path, overrides: dict) -> tuple[StudyConfig, dict[str, object]]:
    """The study's settings (the profile's study block, overridden by the options that are set) and the sizes
    every experiment runs with (the profile's other blocks, as ``-S`` keys)."""
    blocks = read_params(profile)
    settings = blocks.get(NAME) or {}
    if not isinstance(settings, dict):
        raise InputError(f"{profile}: '{NAME}' must be a block of settings")
    block = {**settings, **{key: value for key, value in overrides.items() if value is not None}}
    hint = f" (set it in the profile's {NAME} block or pass its option)"
    cfg = validate_block(NAME, block, profile, StudyConfig, hint)
    return cfg, flatten({name: values for name, values in blocks.items() if name != NAME})


def read_runs(run_record: Path) -> list[dict]:
    if not run_record.is_file():
        return []
    record = json.loads(run_record.read_text())
    return record["runs"] if "runs" in record else [record]  # one run, as an older version recorded it


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def tracking_uri() -> str:
    """Queued experiments run in temporary copies of the repository: a relative sqlite path would lose them."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    return uri


def finished_results(results_file: Path) -> tuple[list, list]:
    """(every finished study experiment, those of them saved in ``results_file``): the saved ones merged with
    `dvc exp show`'s."""
    from revision.study import merge_results, results_from_record, study_results

    shown = subprocess.run(["dvc", "exp", "show", "--json", "--all-commits"], capture_output=True, text=True, check=True)
    saved = results_from_record(json.loads(results_file.read_text())) if results_file.is_file() else []
    return merge_results(saved, study_results(json.loads(shown.stdout))), saved


def write_report(report: Path, run_record: Path, results_file: Path) -> None:
    from revision.ablation_report import render
    from revision.outputs import atomic_file
    from revision.study import results_record

    results, saved = finished_results(results_file)
    if not results:
        raise InputError(f"no finished study experiments in `dvc exp show` or {results_file}; run `revision study` first")
    write_json(results_file, results_record(results))
    with atomic_file(report) as tmp:
        tmp.write_text(render(results, read_runs(run_record)))
    typer.echo(f"study: wrote {report} and {results_file} from {len(results)} experiments ({len(saved)} saved before)")
