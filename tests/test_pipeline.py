"""The real CLI through `dvc repro` on the tiny profile, in a temporary copy of the repository."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import sqlite3
import sys

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from revision.embedding_sets import EmbeddingSet
from stages.cli import app
from tests.helpers import copy_repo, edit_params, run

pytestmark = pytest.mark.slow

# Every edge of the pipeline: one per stage output another stage lists in its deps (dvc.yaml). `dvc dag`
# draws them all, the transitive ones (prepare -> pretrain, ...) too.
DAG_EDGES = {
    ("prepare", "encoder"),
    ("prepare", "embed"), ("encoder", "embed"),
    ("prepare", "visual"), ("encoder", "visual"),
    ("prepare", "realign"), ("embed", "realign"),
    ("prepare", "pretrain"), ("embed", "pretrain"), ("visual", "pretrain"), ("realign", "pretrain"), ("lm", "pretrain"),
    ("prepare", "finetune"), ("embed", "finetune"), ("visual", "finetune"), ("pretrain", "finetune"), ("lm", "finetune"),
    ("prepare", "evaluate"), ("embed", "evaluate"), ("visual", "evaluate"), ("pretrain", "evaluate"), ("finetune", "evaluate"),
    ("lm", "evaluate"),
}


def dag_edges(dot: str) -> set[tuple[str, str]]:
    """The (from, to) stage pairs of `dvc dag --dot` output."""
    return set(re.findall(r'^\s*"?([^"\s;]+)"?\s*->\s*"?([^"\s;]+)"?', dot, flags=re.M))


def test_repro_writes_every_stage_output(tiny_repo):
    prepared = tiny_repo / "data" / "prepared"
    for name in ("encoder_pairs", "text_corpus", "image_pool", "pretrain_pairs", "eval"):
        assert not pd.read_parquet(prepared / f"{name}.parquet").empty, name
    assert json.loads((prepared / "sft.json").read_text())
    assert (tiny_repo / "data" / "encoder" / "encoder.json").exists()
    metrics = json.loads((tiny_repo / "reports" / "encoder.json").read_text())
    assert {"modality_gap", "zeroshot_fashion_mnist_class", "zeroshot_easyvqa_colour"} <= set(metrics)


def test_embeddings_are_normalized_complete_and_tagged_with_the_encoder(tiny_repo):
    identity = json.loads((tiny_repo / "data" / "encoder" / "encoder.json").read_text())["identity"]
    text = pd.read_parquet(tiny_repo / "data" / "prepared" / "text_corpus.parquet")
    emb = EmbeddingSet(tiny_repo / "data" / "embeddings" / "text")
    assert emb.ids() == text["id"].tolist()  # every row, in manifest order
    assert len(emb.shards) > 1  # the tiny profile's shard size forces several shards
    vectors = emb.load()
    assert vectors.dtype == np.float32 and vectors.shape == (len(text), identity["dim"])
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    for name in ("image_pool", "eval_images", "eval_text", "sft_images", "pretrain_images"):
        assert EmbeddingSet(tiny_repo / "data" / "embeddings" / name).encoder == identity


STAGES = {"prepare", "encoder", "embed", "realign", "lm", "pretrain", "finetune", "evaluate"}


def pipeline_runs(db: sqlite3.Connection) -> dict[str, dict]:
    """Per parent run id: its name, the names of the stage runs nested under it, its params and metrics."""
    parents = dict(db.execute("select r.run_uuid, r.name from runs r join tags t on t.run_uuid = r.run_uuid where t.key = 'pipeline'"))
    children = db.execute("select t.value, r.name from runs r join tags t on t.run_uuid = r.run_uuid where t.key = 'mlflow.parentRunId'")
    groups = {run_id: {"name": name, "stages": [], "params": {}, "metrics": set()} for run_id, name in parents.items()}
    for parent, name in children:
        groups[parent]["stages"].append(name)
    for run_id, group in groups.items():
        group["params"] = dict(db.execute("select key, value from params where run_uuid = ?", (run_id,)))
        group["metrics"] = {k for (k,) in db.execute("select key from metrics where run_uuid = ?", (run_id,))}
    return groups


def test_each_stage_logs_one_mlflow_run_with_params_and_git_tag(tiny_repo):
    db = sqlite3.connect(tiny_repo / "mlflow.db")
    runs = dict(db.execute("select r.run_uuid, r.name from runs r join tags t on t.run_uuid = r.run_uuid where t.key = 'stage'"))
    assert sorted(runs.values()) == sorted(STAGES)  # one run per stage
    tags = db.execute("select key, value from tags where key='git_revision'").fetchall()
    head = run(["git", "rev-parse", "HEAD"], tiny_repo).stdout.strip()
    assert tags and all(v == head for _, v in tags)
    params = {k for (k,) in db.execute("select key from params")}
    assert "encoder.lit.embed_dim" in params and "embed.shard_size" in params
    kind = db.execute("select value from experiment_tags where key = 'mlflow.experimentKind'").fetchall()
    assert kind == [("custom_model_development",)]  # marked as model training, not a GenAI app


def test_an_experiment_nests_its_stage_runs_under_one_parent_with_all_params_and_final_metrics(tiny_repo, tmp_path):
    """`dvc repro`, then `dvc exp run -S realign.trace=false`: two parent runs, side by side in MLflow."""
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo, symlinks=True)
    run(["dvc", "exp", "run", "-S", "realign.trace=false"], repo)
    groups = pipeline_runs(sqlite3.connect(repo / "mlflow.db"))
    assert len(groups) == 2
    baseline, ablation = sorted(groups.values(), key=lambda g: len(g["stages"]), reverse=True)
    assert sorted(baseline["stages"]) == sorted(STAGES)
    assert sorted(ablation["stages"]) == ["evaluate", "finetune", "pretrain", "realign"]  # what the change re-ran
    assert (baseline["params"]["realign.trace"], ablation["params"]["realign.trace"]) == ("True", "False")
    assert baseline["params"].keys() == ablation["params"].keys() >= {"encoder.lit.embed_dim", "finetune.lr"}
    # only the ablated param differs, though `dvc exp run -S` rewrote params.yaml (`"no"` became a bare `no`)
    assert {k for k, v in baseline["params"].items() if ablation["params"][k] != v} == {"realign.trace"}
    for group in (baseline, ablation):
        assert {"evaluate/finetune/cider", "realign/after.trace_ratio", "finetune/loss_last"} <= group["metrics"]
    assert ablation["name"] != baseline["name"]


def test_dvc_plots_pages_draw_the_loss_curves_without_a_network(tiny_repo, tmp_path):
    run(["dvc", "plots", "show", "-o", str(tmp_path / "plots")], tiny_repo)
    page = (tmp_path / "plots" / "index.html").read_text()
    assert "cdn." not in page and "<script src=" not in page  # nothing to fetch
    assert "window.vegaEmbed=" in page  # the libraries are inline
    for curve in ("pretrain_loss.csv", "finetune_loss.csv", "encoder_loss.csv"):
        assert curve in page


def test_dag_and_param_change_rerun_only_dependents(tiny_repo):
    dag = dag_edges(run(["dvc", "dag", "--dot"], tiny_repo).stdout)
    assert dag == DAG_EDGES, f"missing: {sorted(DAG_EDGES - dag)}, unexpected: {sorted(dag - DAG_EDGES)}"
    assert json.loads(run(["dvc", "status", "--json"], tiny_repo).stdout) == {}
    params = tiny_repo / "params.yaml"
    original = params.read_text()
    try:
        params.write_text(original.replace("shard_size: 50", "shard_size: 40"))
        changed = set(json.loads(run(["dvc", "status", "--json"], tiny_repo).stdout))
    finally:
        params.write_text(original)
    assert "embed" in changed and not changed & {"prepare", "encoder"}


def test_an_sft_only_change_retrains_neither_the_encoder_nor_stage_1(tiny_repo, tmp_path):
    """Stages depend on the manifests they read, not on all of data/prepared: existence questions change sft.json
    only, so DVC re-runs what reads SFT and keeps the encoder, the alignment and stage 1."""
    repo = shutil.copytree(tiny_repo, tmp_path / "repo", symlinks=True)
    edit_params(repo / "params.yaml", "prepare", existence_questions=2)
    run(["dvc", "repro", "--single-item", "prepare"], repo)
    changed = set(json.loads(run(["dvc", "status", "--json"], repo).stdout))
    assert {"embed", "visual", "finetune"} <= changed, changed
    assert not changed & {"prepare", "encoder", "realign", "pretrain", "lm", "evaluate"}, changed


def test_a_copy_of_the_project_runs_its_own_code(tmp_path):
    """DVC runs queued experiments in copies of the repository; the installed `revision` must run the copy's
    code there (stage command and library), not the workspace's, or an edit made after queueing would leak in."""
    repo = copy_repo(tmp_path, profile=None)
    stage = repo / "stages" / "prepare.py"
    stage.write_text(stage.read_text().replace("Turn the bundled", "Copy-made prepare: turn the bundled", 1))
    config = repo / "src" / "revision" / "config.py"
    config.write_text(config.read_text().replace("POPE-style yes/no questions", "copy-made yes/no questions", 1))
    for command in (["revision", "prepare", "--help"], [sys.executable, "-m", "stages", "prepare", "--help"]):
        shown = " ".join(run(command, repo).stdout.split())
        assert "Copy-made prepare" in shown and "copy-made yes/no questions" in shown, command


def test_prepare_splits_are_disjoint(tiny_repo):
    prepared = tiny_repo / "data" / "prepared"
    tables = {n: pd.read_parquet(prepared / f"{n}.parquet") for n in ("encoder_pairs", "image_pool", "pretrain_pairs", "eval")}
    sft = pd.DataFrame(json.loads((prepared / "sft.json").read_text()))
    images = [set(t["image"]) for t in tables.values()] + [set(sft["image"])]
    assert sum(len(s) for s in images) == len(set().union(*images))
    # text-corpus captions come from images that are in no split
    text_sources = {i.split("-", 1)[1].rsplit("-", 1)[0] for i in pd.read_parquet(prepared / "text_corpus.parquet")["id"]}
    used = {p.removeprefix("images/").removesuffix(".png") for s in images for p in s}
    assert text_sources and not text_sources & used


def test_realign_stage_aligns_the_corpus_and_reports_the_gap(tiny_repo):
    aligned = EmbeddingSet(tiny_repo / "data" / "realign" / "aligned_text")
    raw = EmbeddingSet(tiny_repo / "data" / "embeddings" / "text")
    images = EmbeddingSet(tiny_repo / "data" / "embeddings" / "image_pool").load()
    assert aligned.ids() == raw.ids() and aligned.encoder == raw.encoder
    gap_before = np.linalg.norm(raw.load().mean(0) - images.mean(0))
    gap_after = np.linalg.norm(aligned.load().mean(0) - images.mean(0))
    assert gap_after < 0.1 * gap_before
    stats = json.loads((tiny_repo / "data" / "realign" / "stats.json").read_text())
    assert {"mu_txt", "mu_img", "mu_hat", "scale", "trace_txt", "trace_img"} <= set(stats)
    assert (tiny_repo / "reports" / "realign" / "metrics.json").exists()
    assert (tiny_repo / "reports" / "realign" / "pca.png").stat().st_size > 0


def test_both_training_stages_lower_the_loss_and_log_curves(tiny_repo):
    for stage in ("pretrain", "finetune"):
        summary = json.loads((tiny_repo / "reports" / f"{stage}.json").read_text())
        assert summary["steps"] > 0 and summary["loss_last"] < summary["loss_first"], (stage, summary)
        curve = pd.read_csv(tiny_repo / "reports" / f"{stage}_loss.csv")
        assert list(curve.columns) == ["step", "loss", "lr"] and len(curve) == summary["steps"]
    assert not (tiny_repo / "data" / "checkpoints" / "pretrain").exists()  # removed once the stage finished


def test_chat_answers_from_stage1_and_final_checkpoints(tiny_repo):
    image = next((tiny_repo / "data" / "prepared" / "images").glob("easyvqa-*.png"))
    with contextlib.chdir(tiny_repo):  # in this process: the same CLI without the interpreter start-up
        for checkpoint in ("data/pretrain", "data/finetune"):
            result = CliRunner().invoke(app, ["chat", "--image", str(image), "--checkpoint", checkpoint, "--max-new-tokens", "4"])
            assert result.exit_code == 0 and result.stdout.strip(), checkpoint
        missing = CliRunner().invoke(app, ["chat", "--image", "nope.png", "--checkpoint", "data/finetune"])
    assert missing.exit_code == 2 and "nope.png: image file not found" in missing.output


def test_evaluate_scores_both_checkpoints(tiny_repo):
    metrics = json.loads((tiny_repo / "reports" / "evaluate" / "metrics.json").read_text())
    assert set(metrics) == {"pretrain", "finetune"}
    for scores in metrics.values():
        assert {"bleu4", "cider", "caption_nll", "vqa_acc", "pope_acc"} <= set(scores)
    rows = (tiny_repo / "reports" / "evaluate" / "finetune.jsonl").read_text().splitlines()
    assert {json.loads(r)["kind"] for r in rows} >= {"caption", "vqa"}
