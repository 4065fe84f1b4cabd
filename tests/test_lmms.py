"""The project in lmms-eval: the offline task holds evaluate's items, and the harness scores them as evaluate does.

The harness tests need the lmms extra (`make lmms`); without it they are skipped, saying so.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from revision.config import EvaluateConfig
from revision.errors import InputError
from revision.evaluate import RANKED_PROBES, eval_images, eval_questions, pope_metrics, ranked_pairs
from revision.lmms_task import pope_f1, pope_results, ranked_results, task_docs, vqa_results, write_task
from tests.helpers import BIN, run
from tests.test_evaluate import eval_rows

pytestmark = pytest.mark.lmms  # `make test-lmms` runs this module after installing the extra
CFG = EvaluateConfig(seed=0, max_images=6, max_questions=2, batch_size=4, max_new_tokens=8, mixed_precision="no")


def needs_lmms_eval():
    return pytest.importorskip("lmms_eval", reason="the lmms extra is not installed: `make lmms` installs lmms-eval")


@pytest.fixture
def prepared(tmp_path) -> Path:
    (tmp_path / "prepared").mkdir()
    pd.DataFrame(eval_rows()).to_parquet(tmp_path / "prepared" / "eval.parquet", index=False)
    return tmp_path / "prepared"


def test_task_docs_are_the_items_evaluate_asks(prepared):
    docs = task_docs(prepared, CFG)
    images, _ = eval_images(prepared, CFG)
    questions = eval_questions(images, CFG)
    for kind in ("vqa", "pope"):
        asked = [(images[q.image].id, q.text, q.answer) for q in questions if q.kind == kind]
        assert [(d["id"], d["question"], d["answer"]) for d in docs[f"revision_{kind}"]] == asked
    pairs = [(p.truth, p.other, list(p.captions)) for probe in RANKED_PROBES for p in ranked_pairs(images, probe, 0)]
    assert [(d["truth"], d["other"], d["choices"]) for d in docs["revision_ranked"]] == pairs
    assert pairs and all(Path(d["image"]).is_absolute() for d in docs["revision_vqa"])
    assert docs["revision_vqa"][0]["image"] == str((prepared / "images" / f"{docs['revision_vqa'][0]['id']}.png").resolve())


def test_task_folder_names_functions_that_exist(prepared, tmp_path):
    import revision.lmms_task as task_module

    counts = write_task(prepared, CFG, tmp_path / "task")
    assert counts == {name: len(rows) for name, rows in task_docs(prepared, CFG).items()}
    loader = type("Loader", (yaml.SafeLoader,), {})
    loader.add_constructor("!function", lambda loader, node: ("function", loader.construct_scalar(node)))
    named = []
    for name in ("revision_vqa", "revision_pope", "revision_ranked"):
        config = yaml.load((tmp_path / "task" / f"{name}.yaml").read_text(), Loader=loader)
        data = Path(config["dataset_kwargs"]["data_files"]["test"])
        assert data.read_text().count("\n") == counts[name]
        named += [v[1] for v in config.values() if isinstance(v, tuple)]
        named += [m["aggregation"][1] for m in config["metric_list"] if isinstance(m["aggregation"], tuple)]
    assert {"utils.doc_to_visual", "utils.ranked_results", "utils.pope_f1"} <= set(named)
    for function in named:
        assert callable(getattr(task_module, function.removeprefix("utils."))), function
    group = yaml.safe_load((tmp_path / "task" / "revision_eval.yaml").read_text())
    assert group["task"] == ["revision_vqa", "revision_pope", "revision_ranked"]


def test_task_scoring_is_evaluates():
    assert vqa_results({"answer": "red"}, ["Red."]) == {"vqa_acc": 1.0}
    assert vqa_results({"answer": "red"}, ["blue"]) == {"vqa_acc": 0.0}
    said, truth = ["yes", "no", None, "yes"], ["yes", "yes", "no", "no"]
    items = [pope_results({"answer": t}, [s or "maybe"])["pope_f1"] for s, t in zip(said, truth)]
    assert pope_f1(items) == pope_metrics(said, truth)["pope_f1"] == pytest.approx(0.5)
    # strictly more likely, like evaluate's margin > 0; and the str() form lmms-eval 0.7.3 stores
    assert ranked_results({"probe": "colour"}, [(-1.0, False), (-2.0, True)]) == {"rank_acc": 1.0, "rank_colour_acc": 1.0}
    assert ranked_results({"probe": "shape"}, ["(-2.0, False)", "(-2.0, False)"])["rank_shape_acc"] == 0.0


# ---------------------------------------------------------------- the harness on the tiny pipeline


def harness(repo: Path, task: Path, out: Path, tasks: str, launch: list[str] | None = None, **model_args) -> dict:
    args = ",".join(f"{k}={v}" for k, v in {"pretrained": repo / "data" / "finetune", "encoder": repo / "data" / "encoder",
                                             **model_args}.items())
    command = [*(launch or [str(BIN / "python")]), "-m", "lmms_eval", "--model", "revision", "--model_args", args,
               "--include_path", str(task), "--tasks", tasks, "--batch_size", "3", "--output_path", str(out),
               "--log_samples"]
    run(command, out.parent, env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    (results,) = out.glob("*/*_results.json")
    return json.loads(results.read_text())["results"]


@pytest.fixture
def task(tiny_repo, tmp_path) -> Path:
    """The tiny eval set as lmms-eval tasks, written through the CLI (outside the shared tiny repository)."""
    needs_lmms_eval()
    run(["revision", "lmms-task", "--out", str(tmp_path / "task")], tiny_repo)
    return tmp_path / "task"


@pytest.mark.slow
def test_the_harness_scores_the_tiny_checkpoint_as_evaluate_does(tiny_repo, task, tmp_path):
    results = harness(tiny_repo, task, tmp_path / "out", "revision_eval")
    evaluated = json.loads((tiny_repo / "reports" / "evaluate" / "metrics.json").read_text())["finetune"]
    scored = {**results["revision_vqa"], **results["revision_pope"], **results["revision_ranked"]}
    names = ["vqa_acc", "pope_acc", "pope_f1", "pope_yes_ratio"]
    names += [f"rank_{probe}_acc" for probe in RANKED_PROBES if f"rank_{probe}_acc" in evaluated]
    assert len(names) > 4
    assert {n: scored[f"{n},none"] for n in names} == pytest.approx({n: evaluated[n] for n in names}, abs=1e-9)
    # item by item: the same answer to the same prompt
    rows = [json.loads(line) for line in (tiny_repo / "reports" / "evaluate" / "finetune.jsonl").open()]
    for kind in ("vqa", "pope"):
        (samples,) = (tmp_path / "out").glob(f"*/*_samples_revision_{kind}.jsonl")
        answered = [(s["input"], s["filtered_resps"]) for s in map(json.loads, samples.open())]
        assert answered == [(r["prompt"], r["prediction"]) for r in rows if r["kind"] == kind]


@pytest.mark.slow
def test_two_processes_share_the_requests_and_agree_with_one(tiny_repo, task, tmp_path):
    one = harness(tiny_repo, task, tmp_path / "one", "revision_vqa")
    launch = [str(BIN / "accelerate"), "launch", "--num_processes", "2", "--cpu"]
    two = harness(tiny_repo, task, tmp_path / "two", "revision_vqa", launch)
    assert two["revision_vqa"]["vqa_acc,none"] == one["revision_vqa"]["vqa_acc,none"]


@pytest.mark.slow
def test_loglikelihoods_are_the_models_answer_scores(tiny_repo):
    needs_lmms_eval()
    from lmms_eval.api.instance import Instance

    from revision.embedding_sets import EmbeddingSet
    from revision.lmms_model import RevisionModel
    from revision.training_data import vectors_by_id

    cfg = EvaluateConfig(**yaml.safe_load((tiny_repo / "params.yaml").read_text())["evaluate"])
    docs = task_docs(tiny_repo / "data" / "prepared", cfg)["revision_ranked"][:4]
    harness_model = RevisionModel(pretrained=str(tiny_repo / "data" / "finetune"), encoder=str(tiny_repo / "data" / "encoder"))
    harness_model.task_dict = {"ranked": {"test": docs}}
    from revision.lmms_task import doc_to_visual

    contexts = ["", "What color is the shape?"]  # the caption prompt, and a question
    requests = [Instance("loglikelihood", (context, doc["choices"][0], doc_to_visual, i, "ranked", "test"), idx=0,
                         metadata={"task": "ranked", "doc_id": i, "repeats": 1})
                for context in contexts for i, doc in enumerate(docs)]
    scores = harness_model.loglikelihood(requests)

    model = harness_model.model
    images = EmbeddingSet(tiny_repo / "data" / "embeddings" / "eval_images")
    vectors = torch.from_numpy(vectors_by_id(images, [d["id"] for d in docs], "eval", list(range(len(docs)))))
    conversations = [model.conversation(context or None, d["choices"][0]) for context in contexts for d in docs]
    sums, _, _ = model.answer_scores(vectors.repeat(len(contexts), 1), conversations)
    assert [-ll for ll, _ in scores] == pytest.approx(sums.tolist(), rel=1e-4)
    assert scores[0][0] != pytest.approx(scores[len(docs)][0], rel=1e-4)  # the context is part of the prompt


@pytest.mark.slow
def test_a_checkpoint_with_another_encoder_is_refused(tiny_repo, tmp_path):
    needs_lmms_eval()
    from revision.lmms_model import RevisionModel

    other = shutil.copytree(tiny_repo / "data" / "encoder", tmp_path / "encoder")
    meta = json.loads((other / "encoder.json").read_text())
    meta["identity"]["id"] = "another-encoder"
    (other / "encoder.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="another-encoder"):
        RevisionModel(pretrained=str(tiny_repo / "data" / "finetune"), encoder=str(other))
