"""The study's experiments (conditions × seeds), the noise rule and the report, on a synthetic `dvc exp show --json`."""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess

import pytest
from scipy import stats

from revision.ablation_report import comparisons, render, seed_paired
from revision.study import (
    CONDITIONS,
    STRESS_CONDITIONS,
    World,
    merge_results,
    pending,
    queue_command,
    resolution,
    results_from_record,
    results_record,
    study_experiments,
    study_results,
)
from tests.helpers import BIN, ROOT

PROFILE = {"pretrain.max_samples": 256, "evaluate.max_images": 40}
PLAIN_ONLY = ["--stress-shift", "0", "--existence-questions", "0"]  # `revision study` without its other worlds
# a profile for the CLI tests: the study's settings (the options override them) and one size
TEST_PROFILE = "study:\n  seeds: 1\n  stress_shift: 0.8\n  existence_questions: 1\n  jobs: 1\npretrain:\n  max_samples: 8\n"


def worlds(plain=tuple(CONDITIONS), stress=STRESS_CONDITIONS, existence=()) -> list[World]:
    return [World("", 0, tuple(plain)), World("stress", 0.8, tuple(stress)), World("existence", 2, tuple(existence))]


def test_the_experiments_are_every_condition_and_seed_plus_the_stress_world():
    experiments = study_experiments(range(3), PROFILE, worlds())
    assert len(experiments) == 3 * (len(CONDITIONS) + len(STRESS_CONDITIONS))
    assert len({e.name for e in experiments}) == len(experiments)
    assert len({frozenset(e.overrides) for e in experiments}) == 1  # every experiment sets the same keys
    for e in experiments:
        seed = int(e.name.rsplit("-s", 1)[1])
        assert e.overrides["model.seed"] == e.overrides["pretrain.seed"] == e.overrides["finetune.seed"] == seed
        assert e.overrides["embed.stress_shift"] == (0.8 if e.name.startswith("study-stress-") else 0.0)
        assert e.overrides["prepare.existence_questions"] == 0
        assert e.overrides["pretrain.max_samples"] == 256
    anchor = next(e for e in experiments if e.name == "study-anchor-s0").overrides
    assert (anchor["realign.anchor"], anchor["realign.trace"], anchor["realign.centroid"]) == (True, False, False)
    assert [e.name for e in experiments[:2]] == ["study-none-s0", "study-paired-s0"]  # seed-major order
    assert len(study_experiments(range(2), PROFILE, worlds(stress=()))) == 2 * len(CONDITIONS)


def test_the_existence_world_turns_on_existence_questions_and_nothing_else():
    experiments = study_experiments(range(1), PROFILE, worlds(plain=["full"], stress=[], existence=["full", "vora"]))
    overrides = {e.name: e.overrides for e in experiments}
    assert sorted(overrides) == ["study-existence-full-s0", "study-existence-vora-s0", "study-full-s0"]
    plain, existence = overrides["study-full-s0"], overrides["study-existence-full-s0"]
    assert existence["prepare.existence_questions"] == 2 and plain["prepare.existence_questions"] == 0
    assert {k: v for k, v in existence.items() if plain[k] != v} == {"prepare.existence_questions": 2}
    assert overrides["study-existence-vora-s0"]["embed.stress_shift"] == 0


def test_queue_command_writes_yaml_booleans():
    command = queue_command(next(e for e in study_experiments([0], PROFILE, worlds(stress=())) if e.name == "study-full-s0"))
    assert command[:7] == ["dvc", "--wait-for-lock", "exp", "run", "--queue", "--name", "study-full-s0"]
    assert "realign.centroid=true" in command and "pretrain.source=aligned" in command
    assert "finetune.ross=false" in command and "pretrain.ross=false" in command
    ross = queue_command(next(e for e in study_experiments([0], PROFILE, worlds(stress=())) if e.name == "study-full_ross-s0"))
    assert "finetune.ross=true" in ross and "pretrain.ross=false" in ross and "realign.centroid=true" in ross


def _experiment(name: str, garment: float, nll: float, error: str | None = None) -> dict:
    metrics = {"pretrain": {"rank_garment_acc": garment, "caption_nll": nll}, "finetune": {"rank_garment_acc": garment + 0.1, "cider": 1.0}}
    realign = {
        "after": {"centroid_gap": 0.001},
        "before": {"centroid_gap": 0.5},
        "probe_class_name": {"text_aligned": 0.9, "text_raw": 0.6},
    }
    data = {
        "rev": name[:7],
        "timestamp": "2026-11-22T10:00:00",
        "params": {"params.yaml": {"data": {"embed": {"stress_shift": 0.8 if "stress" in name else 0.0}}}},
        "metrics": {"reports/evaluate/metrics.json": {"data": metrics}, "reports/realign/metrics.json": {"data": realign}},
    }
    return {"rev": name[:7], "name": name, "data": data, "error": error, "experiments": None}


def _exp_show(experiments: list[dict]) -> list[dict]:
    """The shape of `dvc exp show --json` (DVC 3): the workspace, then the baseline with its experiments."""
    return [
        {"rev": "workspace", "name": None, "data": {"rev": "workspace", "params": {}, "metrics": {}}, "experiments": None},
        {"rev": "abc1234", "name": "main", "data": {"rev": "abc1234", "params": {}, "metrics": {}},
         "experiments": [{"name": e["name"], "executor": None, "revs": [e]} for e in experiments]},
    ]


def test_report_aggregates_seeds_and_says_what_is_within_noise():
    experiments = [_experiment(f"study-full-s{s}", g, 1.0) for s, g in enumerate([0.60, 0.62, 0.64])]
    experiments += [_experiment(f"study-raw-s{s}", g, 1.5) for s, g in enumerate([0.40, 0.41, 0.42])]
    experiments += [_experiment(f"study-anchor-s{s}", g, 1.0) for s, g in enumerate([0.59, 0.62, 0.65])]
    experiments += [_experiment("study-stress-raw-s0", 0.1, 3.0), _experiment("study-c3-s9", 0.9, 0.1, error="failed")]
    experiments.append(_experiment("my-own-exp", 0.99, 0.1))
    running = _experiment("study-paired-s0", 0.99, 0.1)
    running["data"]["timestamp"] = None  # still running: DVC shows it without a timestamp
    queued = _experiment("study-none-s0", 0.99, 0.1)
    del queued["data"]["metrics"]["reports/evaluate/metrics.json"]
    experiments += [running, queued]
    results = study_results(_exp_show(experiments))
    assert sorted((r.world, r.condition, r.seed) for r in results)[:2] == [("", "anchor", 0), ("", "anchor", 1)]
    assert all(r.condition != "c3" for r in results) and len(results) == 10  # failed and foreign experiments left out
    runs = [{"wall_s": 600.0, "experiments": 10, "jobs": 1, "dvc_exit_code": 0},
            {"started": "2026-12-01T19:35:00", "wall_s": 120.0, "experiments": 3, "jobs": 2, "dvc_exit_code": 0,
             "conditions": ["full"], "stress_conditions": ["raw", "anchor"], "stress_shift": 0.8}]
    report = render(results, runs)
    mean, sd = statistics.fmean([0.60, 0.62, 0.64]), statistics.stdev([0.60, 0.62, 0.64])
    # caption_nll, image_gain (not in these metrics), rank_garment_acc
    assert f"| ReAlign full (ReVision) | 1.000 ± 0.000 | — | {mean:.3f} ± {sd:.3f} |" in report
    raw = next(line for line in report.splitlines() if line.startswith("- raw text (no alignment) vs ReAlign full"))
    assert re.search(r"pretrain rank_garment_acc -0\.210 detected \(p = 0\.00\d\)", raw) and "pretrain image_gain n/a" in raw
    assert "pretrain caption_nll -0.500 detected (p = 0.000)" in raw  # lower NLL is better: raw is worse
    assert re.search(r"ReAlign anchor only vs ReAlign full \(ReVision\): .*pretrain rank_garment_acc [+-]0\.000 not "
                     r"detected \(detectable 0\.\d{3}\)", report)
    assert "| raw text (no alignment) | 3 | 47.50 | 0.500 ± 0.000 |" in report  # raw text: the gap before alignment
    assert "Grid run: 10 experiments in 10.0 min, 1 at a time" in report
    assert "Grid run started 2026-12-01T19:35:00: 3 experiments (plain: full, stress: raw/anchor) in 2.0 min" in report
    assert "embed.stress_shift = 0.8" in report
    with pytest.raises(StopIteration):
        next(line for line in report.splitlines() if "0.99" in line)


def test_a_study_run_again_on_a_newer_commit_replaces_the_older_run():
    old, new = _experiment("study-full-s0", 0.1, 2.0), _experiment("study-full-s0", 0.7, 1.0)
    old["data"]["timestamp"], new["data"]["timestamp"] = "2026-11-20T10:00:00", "2026-11-22T10:00:00"
    results = study_results(_exp_show([new]) + _exp_show([old]))
    assert len(results) == 1 and results[0].metrics["reports/evaluate/metrics.json"]["pretrain"]["rank_garment_acc"] == 0.7


def test_saved_results_round_trip_and_newer_runs_replace_them():
    saved = study_results(_exp_show([_experiment("study-full-s0", 0.1, 2.0), _experiment("study-raw-s0", 0.2, 2.0)]))
    record = json.loads(json.dumps(results_record(saved)))  # what reports/study_results.json holds
    assert results_from_record(record) == saved
    newer = _experiment("study-full-s0", 0.7, 1.0)
    newer["data"]["timestamp"] = "2026-12-01T10:00:00"
    merged = merge_results(results_from_record(record), study_results(_exp_show([newer, _experiment("study-c3-s1", 0.3, 1.5)])))
    garment = {(r.condition, r.seed): r.metrics["reports/evaluate/metrics.json"]["pretrain"]["rank_garment_acc"] for r in merged}
    assert garment == {("full", 0): 0.7, ("raw", 0): 0.2, ("c3", 1): 0.3}


def test_skip_done_leaves_out_the_experiments_with_results():
    experiments = study_experiments(range(2), PROFILE, worlds(plain=["c3", "full"], stress=["full"]))
    done = study_results(_exp_show([_experiment("study-full-s0", 0.1, 2.0), _experiment("study-stress-full-s1", 0.2, 2.0),
                                    _experiment("study-raw-s0", 0.3, 2.0)]))
    assert sorted(r.name for r in done) == ["study-full-s0", "study-raw-s0", "study-stress-full-s1"]
    assert [e.name for e in pending(experiments, done)] == [
        "study-c3-s0", "study-stress-full-s0", "study-c3-s1", "study-full-s1"]
    assert pending(experiments, []) == experiments


def test_the_study_runs_the_chosen_conditions_and_refuses_unknown_ones():
    experiments = study_experiments(range(3), PROFILE, worlds(plain=["full"], stress=["raw", "anchor"]))
    assert sorted(e.name for e in experiments if e.name.endswith("-s0")) == [
        "study-full-s0", "study-stress-anchor-s0", "study-stress-raw-s0"]
    with pytest.raises(ValueError, match="unknown study conditions \\['ful'\\]"):
        study_experiments(range(1), PROFILE, worlds(plain=["ful"]))


def test_run_record_keeps_every_study_run(tmp_path):
    from stages.study import read_runs

    record = tmp_path / "study_run.json"
    assert read_runs(record) == []
    record.write_text(json.dumps({"experiments": 30, "wall_s": 5400.0}))  # one run, as older versions wrote it
    assert read_runs(record) == [{"experiments": 30, "wall_s": 5400.0}]
    record.write_text(json.dumps({"runs": [{"experiments": 30}, {"experiments": 15}]}))
    assert [run["experiments"] for run in read_runs(record)] == [30, 15]


def test_report_shows_the_pope_yes_ratio_and_compares_the_generation_metrics():
    experiments = [_experiment(f"study-{c}-s{s}", 0.6, 1.0) for c in ("full", "c3") for s in range(2)]
    for e in experiments:
        e["data"]["metrics"]["reports/evaluate/metrics.json"]["data"]["finetune"].update(
            pope_f1=0.667, pope_yes_ratio=1.0 if "c3" in e["name"] else 0.4, vqa_acc=0.5
        )
    report = render(study_results(_exp_show(experiments)), [])
    assert "| pope_f1 | pope_yes_ratio | vqa_acc |" in report and "| 1.000 ± 0.000 |" in report
    assert "finetune cider +0.000 not detected (detectable 0.000); finetune vqa_acc +0.000 not detected" in report
    assert "finetune pope_acc n/a; finetune pope_f1 +0.000 not detected" in report


def test_tables_with_the_same_rows_are_shown_once():
    results = study_results(_exp_show([_experiment(f"study-full-s{s}", 0.5, 1.0) for s in range(2)]))
    report = render(results, [])
    assert report.count("| ReAlign full (ReVision) | 2 | 50.16 |") == 1


def _condition(name: str, garments: list[float]) -> list[dict]:
    return [_experiment(f"study-{name}-s{seed}", garment, 1.0) for seed, garment in enumerate(garments)]


def test_a_shift_every_seed_shares_is_detected_where_the_seeds_themselves_vary_more():
    """Seeds vary by 0.1; c3 is 0.02 above full on every one of them: an unpaired test cannot see it, pairing does."""
    seeds = [0.50, 0.60, 0.70, 0.55, 0.65]
    report = render(study_results(_exp_show(_condition("full", seeds) + _condition("c3", [g + 0.02 for g in seeds]))), [])
    line = next(x for x in report.splitlines() if x.startswith("- C3 vs ReAlign full (ReVision)"))
    assert re.search(r"pretrain rank_garment_acc \+0\.020 detected \(p = 0\.0\d\d\)", line)
    assert stats.ttest_ind([g + 0.02 for g in seeds], seeds).pvalue > 0.5


def test_a_one_image_rank_difference_that_every_seed_agrees_on_is_not_a_finding():
    """Seeds that agree exactly have sd 0; a difference of one image of 17 is still not a finding."""
    experiments = _condition("full", [10 / 17] * 3) + _condition("c3", [11 / 17] * 3)
    for experiment in experiments:
        experiment["data"]["metrics"]["reports/evaluate/metrics.json"]["data"]["pretrain"]["n_rank_garment"] = 17
    results = study_results(_exp_show(experiments))
    full, c3 = [r for r in results if r.condition == "full"], [r for r in results if r.condition == "c3"]
    assert seed_paired(c3, full, "pretrain", "rank_garment_acc").p > 0.05  # the one-image floor on the spread
    assert seed_paired(c3, full, "finetune", "rank_garment_acc").p == 0.0  # no item count there: no floor


def test_p_values_are_adjusted_over_every_comparison_of_the_report():
    seeds = [0.50, 0.60, 0.70]
    experiments = _condition("full", seeds) + _condition("c3", [g + 0.03 for g in seeds[:2]] + [0.71])
    experiments += _condition("raw", [g - 0.2 for g in seeds])
    results = study_results(_exp_show(experiments))
    groups = {}
    for result in results:
        groups.setdefault((result.world, result.condition), []).append(result)
    verdicts = comparisons(groups)
    tested = [v for v in verdicts.values() if v.difference is not None]
    assert len(tested) == 2 * 4  # c3 and raw against full, four headline metrics each present
    ps, m = [v.difference.p for v in tested], len(tested)
    expected, running = [0.0] * m, 1.0  # Benjamini-Hochberg by its definition: min over j >= rank of p_(j) m / j
    for rank, i in reversed(list(enumerate(sorted(range(m), key=ps.__getitem__), start=1))):
        running = min(running, ps[i] * m / rank)
        expected[i] = running
    assert [v.p_adjusted for v in tested] == pytest.approx(expected)
    assert all(v.p_adjusted >= v.difference.p for v in tested)
    assert f"adjusted over all {len(tested)} comparisons of this report" in render(results, [])


def test_resolution_is_one_image_of_the_fewest_counted():
    results = study_results(_exp_show([_experiment(f"study-full-s{s}", 0.5, 1.0) for s in range(2)]))
    for result, n in zip(results, (17.0, 23.0)):
        result.metrics["reports/evaluate/metrics.json"]["pretrain"]["n_rank_garment"] = n
    assert resolution(results, "pretrain", "rank_garment_acc") == 1 / 17
    assert resolution(results, "pretrain", "caption_nll") == 0.0
    assert resolution(results, "finetune", "rank_garment_acc") == 0.0  # no counts there: no floor


def test_skip_done_with_every_result_there_queues_nothing_and_writes_the_report(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from stages.cli import app

    monkeypatch.chdir(tmp_path)
    for command in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(command, check=True, env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"})
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")
    saved = study_results(_exp_show([_experiment(f"study-full-s{s}", 0.6, 1.0) for s in range(2)]))
    (tmp_path / "results.json").write_text(json.dumps(results_record(saved)))
    (tmp_path / "profile.yaml").write_text(TEST_PROFILE)
    args = ["study", "--seeds", "2", "--conditions", "full", *PLAIN_ONLY, "--skip-done", "--profile", "profile.yaml",
            "--results", "results.json", "--report", "ablation.md", "--run-record", "run.json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "every experiment asked for has results already" in result.output
    assert "ReAlign full" in (tmp_path / "ablation.md").read_text() and not (tmp_path / "run.json").exists()
    assert not (tmp_path / ".dvc" / "tmp" / "exps").exists()  # nothing was queued


def test_ross_conditions_are_compared_with_the_same_recipe_without_ross():
    names = ("paired", "paired_grid", "paired_grid_ross", "paired_ross", "full", "full_ross")
    report = render(study_results(_exp_show([_experiment(f"study-{c}-s{s}", 0.6, 1.0) for c in names for s in range(2)])), [])
    ross = report[report.index("## Ross's reconstruction loss") :]
    lines = [line for line in ross.splitlines() if line.startswith("- ")]
    assert [line.split(":")[0] for line in lines] == [
        "- paired images (LLaVA-style) vs ReAlign full (ReVision)",
        "- paired images, grid tokens vs paired images (LLaVA-style)",
        "- paired images, grid tokens + Ross (both stages) vs paired images, grid tokens",
        "- paired images + Ross (both stages) vs paired images (LLaVA-style)",
        "- ReAlign full + Ross (stage 2) vs ReAlign full (ReVision)",
    ]
    assert "| paired images + Ross (both stages) | 2 | — | — | — | — | — | — |" in ross  # no text in stage 1: no gap
    only_paired_and_full = render(study_results(_exp_show([_experiment(f"study-{c}-s0", 0.6, 1.0) for c in ("paired", "full")])), [])
    assert "## Ross's" not in only_paired_and_full  # no Ross row: the table would repeat rows shown before


def test_the_tracking_store_exists_before_the_experiments_start(tmp_path, monkeypatch):
    """Experiments run at once on a new sqlite store each try to create its tables and corrupt it."""
    import sqlite3

    from typer.testing import CliRunner

    import stages.study
    from stages.cli import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    saved = study_results(_exp_show([_experiment("study-full-s0", 0.6, 1.0)]))
    (tmp_path / "results.json").write_text(json.dumps(results_record(saved)))
    (tmp_path / "profile.yaml").write_text(TEST_PROFILE)
    tables_when_run: list[set] = []

    def fake_run(command, **kwargs):
        if command[:4] == ["dvc", "exp", "run", "--run-all"]:
            with sqlite3.connect(tmp_path / "mlflow.db") as db:
                tables_when_run.append({row[0] for row in db.execute("select name from sqlite_master")})
        return subprocess.CompletedProcess(command, 0, stdout="[]", stderr="")

    monkeypatch.setattr(stages.study.subprocess, "run", fake_run)
    args = ["study", "--seeds", "1", "--conditions", "full", *PLAIN_ONLY, "--profile", "profile.yaml", "--jobs", "2",
            "--results", "results.json", "--report", "ablation.md", "--run-record", "run.json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert len(tables_when_run) == 1 and {"experiments", "runs", "metrics"} <= tables_when_run[0]


def test_vora_conditions_are_compared_with_the_encoder_with_grid_tokens_and_with_full_vora():
    names = ("paired", "full", "paired_grid", "vora", "vora_nodistill", "vora_causal")
    report = render(study_results(_exp_show([_experiment(f"study-{c}-s{s}", 0.6, 1.0) for c in names for s in range(2)])), [])
    vora = report[report.index("## VoRA, encoder-free") :]
    lines = [line.split(":")[0] for line in vora.splitlines() if line.startswith("- ")]
    assert lines[:3] == [
        "- VoRA (pixels, vision LoRA, distilled) vs paired images, grid tokens",
        "- VoRA without distillation vs VoRA (pixels, vision LoRA, distilled)",
        "- VoRA with a causal mask vs VoRA (pixels, vision LoRA, distilled)",
    ]
    overrides = {e.name: e.overrides for e in study_experiments([0], {}, worlds(plain=["vora_causal", "full"], stress=[]))}
    assert overrides["study-vora_causal-s0"]["vora.attention"] == "causal"
    assert overrides["study-full-s0"]["vora.attention"] == "bidirectional"  # every experiment sets every key
    assert overrides["study-vora_causal-s0"]["model.visual_input"] == "pixels"


def test_report_says_when_experiments_ran_on_different_encoder_builds():
    experiments = [_experiment(f"study-full-s{s}", 0.6, 1.0) for s in range(3)]
    for experiment, build in zip(experiments, ["aaaa", "aaaa", "bbbb"]):
        experiment["data"]["metrics"]["reports/encoder.json"] = {"data": {"encoder": {"id": build}}}
    report = render(study_results(_exp_show(experiments)), [])
    assert "ran on 2 builds of the encoder" in report and "aaaa (2 experiments), bbbb (1 experiments)" in report
    same = render(study_results(_exp_show(experiments[:2])), [])
    assert "builds of the encoder" not in same


def test_comparisons_pair_only_seeds_run_on_the_same_encoder_build_and_precision():
    experiments = [_experiment(f"study-{c}-s{s}", 0.6, 1.0) for c in ("full", "raw") for s in range(2)]
    experiments += [_experiment("study-full-s2", 0.7, 1.0), _experiment("study-raw-s2", 0.9, 1.0)]
    for experiment in experiments[-2:]:
        experiment["data"]["metrics"]["reports/encoder.json"] = {"data": {"encoder": {"id": "aaaa"}}}
        experiment["data"]["metrics"]["reports/pretrain.json"] = {"data": {"precision": "no"}}
    experiments[-1]["data"]["metrics"]["reports/encoder.json"] = {"data": {"encoder": {"id": "cccc"}}}  # raw, seed 2
    partly = render(study_results(_exp_show(experiments)), [])
    line = next(x for x in partly.splitlines() if x.startswith("- raw text (no alignment) vs ReAlign full"))
    assert "pretrain rank_garment_acc +0.000 not detected" in line  # seeds 0 and 1 only: seed 2 would add +0.2
    assert line.endswith("(seeds left out, another encoder build or precision: seed 2: encoder cccc, precision no/no/no "
                         "vs encoder aaaa, precision no/no/no)")
    experiments = experiments[:-2]
    for experiment in experiments:
        experiment["data"]["metrics"]["reports/encoder.json"] = {"data": {"encoder": {"id": "aaaa"}}}
        experiment["data"]["metrics"]["reports/pretrain.json"] = {"data": {"precision": "no"}}
    compared = render(study_results(_exp_show(experiments)), [])
    assert "- raw text (no alignment) vs ReAlign full (ReVision): pretrain caption_nll" in compared
    experiments[1]["data"]["metrics"]["reports/pretrain.json"] = {"data": {"precision": "bf16"}}  # full, seed 1
    refused = render(study_results(_exp_show(experiments)), [])
    assert ("- raw text (no alignment) vs ReAlign full (ReVision): not compared, fewer than two seeds ran on the same "
            "encoder build and precision (seeds left out, another encoder build or precision: seed 1: encoder aaaa, "
            "precision no/no/no vs encoder aaaa, precision bf16/no/no)") in refused
    assert "ran at 2 precisions (pretrain/finetune/evaluate; no: fp32): bf16/no/no (1 experiments), no/no/no (3" in refused
    experiments[3]["data"]["metrics"]["reports/encoder.json"] = {"data": {"encoder": {"id": "bbbb"}}}  # raw, seed 1
    assert "seed 1: encoder bbbb, precision no/no/no vs encoder aaaa, precision bf16/no/no" in render(
        study_results(_exp_show(experiments)), [])


def test_experiments_that_leave_no_result_fail_the_study_and_are_recorded(tmp_path, monkeypatch):
    """`dvc exp run --run-all` exits 0 when its experiments fail: the study must not."""
    from typer.testing import CliRunner

    import stages.study
    from stages.cli import app

    monkeypatch.chdir(tmp_path)
    saved = study_results(_exp_show([_experiment("study-raw-s0", 0.6, 1.0)]))
    (tmp_path / "results.json").write_text(json.dumps(results_record(saved)))
    (tmp_path / "profile.yaml").write_text(TEST_PROFILE)
    ok = lambda command, **kwargs: subprocess.CompletedProcess(command, 0, stdout="[]", stderr="")  # noqa: E731
    monkeypatch.setattr(stages.study.subprocess, "run", ok)
    args = ["study", "--seeds", "1", "--conditions", "full,raw", *PLAIN_ONLY, "--profile", "profile.yaml",
            "--results", "results.json", "--report", "ablation.md", "--run-record", "run.json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "1 of 2 experiments have no result: study-full-s0" in result.output
    assert json.loads((tmp_path / "run.json").read_text())["runs"][0]["without_result"] == ["study-full-s0"]
    assert "without a result: study-full-s0" in (tmp_path / "ablation.md").read_text()


def test_the_existence_world_has_its_own_tables_and_is_compared_with_the_plain_world():
    names = [f"study-{w}{c}-s{s}" for w in ("", "existence-") for c in ("full", "full_ross") for s in range(2)]
    experiments = [_experiment(name, 0.8 if "existence" in name else 0.6, 1.0) for name in names]
    for e in experiments:
        e["data"]["params"]["params.yaml"]["data"]["prepare"] = {"existence_questions": 1 if "existence" in e["name"] else 0}
    results = study_results(_exp_show(experiments))
    assert {r.world for r in results} == {"", "existence"} and len(results) == 8
    report = render(results, [{"wall_s": 60.0, "experiments": 4, "jobs": 2, "dvc_exit_code": 0,
                               "existence_conditions": ["full", "full_ross"]}])
    assert "## Ross's reconstruction loss (with and without), with existence questions in SFT (prepare.existence_questions = 1)" in report
    assert "(existence: full/full_ross)" in report
    effect = report[report.index("What a world's setting changes") :]
    line = next(x for x in effect.splitlines() if x.startswith("- ReAlign full (ReVision) (existence) vs ReAlign full (ReVision):"))
    assert "pretrain rank_garment_acc +0.200 detected (p = 0.000)" in line


def test_results_saved_before_worlds_existed_still_load():
    old = {"experiments": [{"stress": True, "condition": "raw", "seed": 0, "params": {}, "metrics": {}, "finished": "x"},
                           {"stress": False, "condition": "full", "seed": 1, "params": {}, "metrics": {}}]}
    assert [r.name for r in results_from_record(old)] == ["study-stress-raw-s0", "study-full-s1"]


def test_the_study_settings_come_from_the_profile_and_the_options_override_them():
    from revision.config import flatten, read_params
    from stages.study import read_profile

    shipped = ROOT / "profiles" / "study.yaml"
    cfg, sizes = read_profile(shipped, {"seeds": None, "stress_shift": None, "existence_questions": None, "jobs": None})
    assert cfg.model_dump() == read_params(shipped)["study"]
    assert sizes == flatten({block: values for block, values in read_params(shipped).items() if block != "study"})
    assert not any(key.startswith("study.") for key in sizes)  # the study's settings are not passed to its experiments
    overridden, _ = read_profile(shipped, {"seeds": 1, "stress_shift": 0.0, "existence_questions": None, "jobs": 2})
    assert overridden.model_dump() == {**cfg.model_dump(), "seeds": 1, "stress_shift": 0.0, "jobs": 2}


def test_a_profile_without_the_study_settings_needs_the_options(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from stages.cli import app

    monkeypatch.chdir(tmp_path)
    (tmp_path / "profile.yaml").write_text("pretrain:\n  max_samples: 8\n")
    result = CliRunner().invoke(app, ["study", "--seeds", "1", *PLAIN_ONLY, "--profile", "profile.yaml"])
    assert result.exit_code == 2 and "study.jobs: Field required" in result.output


def test_the_gap_columns_show_the_eval_pair_geometry_of_the_text_stage_1_trained_on():
    experiments = _condition("full", [0.6, 0.6]) + _condition("raw", [0.5, 0.5])
    for experiment in experiments:
        realign = experiment["data"]["metrics"]["reports/realign/metrics.json"]["data"]
        realign["geometry_before"] = {"phi": 0.25, "psi": 0.8, "omega_k": 0.3}
        realign["geometry_after"] = {"phi": 0.75, "psi": 0.9, "omega_k": 0.4}
    report = render(study_results(_exp_show(experiments)), [])
    assert "| trace_ratio | knn_mixing | t2i_r1 | probe_acc | phi | psi | omega_k |" in report
    assert "| 0.750 ± 0.000 | 0.900 ± 0.000 | 0.400 ± 0.000 |" in report  # full: after alignment
    assert "| 0.250 ± 0.000 | 0.800 ± 0.000 | 0.300 ± 0.000 |" in report  # raw text: before it
