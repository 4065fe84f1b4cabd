"""The project's eval split as an offline lmms-eval task group, ``revision_eval``.

``write_task`` turns the same seeded eval images and questions that ``revision evaluate`` asks (params.yaml's
``evaluate`` block) into three lmms-eval tasks, JSON lines the harness reads from local files with no network:

- ``revision_vqa``: the easy-VQA / Fashion-MNIST questions, generated, scored by evaluate's exact match;
- ``revision_pope``: the shape-existence yes/no probes (accuracy, F1 with "yes" positive, yes-ratio);
- ``revision_ranked``: the ranked probes as two-way multiple choice over log-likelihoods (the reference caption
  naming the true garment / colour / shape against the same caption naming another; empty context, which the
  ``revision`` model reads as its caption prompt).

The functions below are what the task YAMLs call (through the ``utils.py`` written beside them).
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import yaml
from PIL import Image

from revision.config import EvaluateConfig
from revision.evaluate import (
    RANKED_PROBES,
    answer_budget,
    answer_matches,
    eval_images,
    eval_questions,
    pope_metrics,
    ranked_pairs,
    yes_no,
)
from revision.images import read_image
from revision.outputs import atomic_dir

GROUP = "revision_eval"
RANKED_METRICS = ["rank_acc", *(f"rank_{probe}_acc" for probe in RANKED_PROBES)]


def task_docs(prepared: Path, cfg: EvaluateConfig) -> dict[str, list[dict]]:
    """The docs of each task, in ``revision evaluate``'s order, image paths made absolute."""
    images, _ = eval_images(prepared, cfg)
    paths = [str((prepared / image.image).resolve()) for image in images]
    docs: dict[str, list[dict]] = {"revision_vqa": [], "revision_pope": [], "revision_ranked": []}
    for question in eval_questions(images, cfg):
        doc = {"id": images[question.image].id, "image": paths[question.image], "question": question.text,
               "answer": question.answer, "type": question.type}
        docs[f"revision_{question.kind}"].append(doc)
    for probe in RANKED_PROBES:
        for pair in ranked_pairs(images, probe, cfg.seed):
            docs["revision_ranked"].append({"id": images[pair.image].id, "image": paths[pair.image], "probe": probe,
                                            "choices": list(pair.captions), "truth": pair.truth, "other": pair.other})
    return docs


def task_configs(data_dir: Path, cfg: EvaluateConfig) -> dict[str, dict]:
    """The YAML of each task (and of the group), reading ``<task>.jsonl`` from ``data_dir``."""
    def task(name: str, output_type: str, metrics: list[tuple[str, str]], **extra) -> dict:
        return {
            "task": name, "dataset_path": "json", "test_split": "test", "output_type": output_type,
            "dataset_kwargs": {"data_files": {"test": str((data_dir / f"{name}.jsonl").resolve())}},
            "doc_to_visual": Function("doc_to_visual"), "doc_to_text": Function("doc_to_text"),
            "metric_list": [{"metric": m, "aggregation": a, "higher_is_better": True} for m, a in metrics],
            "metadata": [{"version": 1.0}], **extra,
        }

    generation = {"max_new_tokens": answer_budget(cfg), "do_sample": False, "temperature": 0, "num_beams": 1}
    return {
        "revision_vqa": task("revision_vqa", "generate_until", [("vqa_acc", "mean")], doc_to_target="answer",
                             generation_kwargs=generation, process_results=Function("vqa_results")),
        "revision_pope": task("revision_pope", "generate_until",
                              [("pope_acc", "mean"), ("pope_f1", Function("pope_f1")), ("pope_yes_ratio", "mean")],
                              doc_to_target="answer", generation_kwargs=generation,
                              process_results=Function("pope_results")),
        "revision_ranked": task("revision_ranked", "multiple_choice", [(m, "mean") for m in RANKED_METRICS],
                                doc_to_choice=Function("ranked_choices"), doc_to_target=0, target_delimiter="",
                                process_results=Function("ranked_results")),
        GROUP: {"group": GROUP, "task": ["revision_vqa", "revision_pope", "revision_ranked"]},
    }


UTILS = '''"""Written by `revision lmms-task`: the task YAMLs' functions live in the installed package."""
from revision.lmms_task import doc_to_text, doc_to_visual, pope_f1, pope_results, ranked_choices, ranked_results, vqa_results  # noqa: F401
'''


def write_task(prepared: Path, cfg: EvaluateConfig, out_dir: Path) -> dict[str, int]:
    """Write the task folder (YAMLs, JSON lines, utils.py) atomically; returns the number of docs per task."""
    out_dir = Path(out_dir)
    docs = task_docs(prepared, cfg)
    with atomic_dir(out_dir) as tmp:
        for name, rows in docs.items():
            (tmp / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        for name, config in task_configs(out_dir, cfg).items():
            (tmp / f"{name}.yaml").write_text(yaml.dump(config, Dumper=_Dumper, sort_keys=False))
        (tmp / "utils.py").write_text(UTILS)
    return {name: len(rows) for name, rows in docs.items()}


class Function(str):
    """A YAML value lmms-eval resolves to a Python function: ``!function utils.<name>``."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(Function, lambda dumper, value: dumper.represent_scalar("!function", f"utils.{value}"))


# ------------------------------------------------------------------ what the YAMLs call


def doc_to_visual(doc: dict) -> list[Image.Image]:
    return [read_image(doc["image"], f"lmms task doc {doc['id']!r}")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    return doc.get("question", "")  # ranked docs: empty, the model's caption prompt


def vqa_results(doc: dict, results: list[str]) -> dict[str, float]:
    return {"vqa_acc": float(answer_matches(results[0], doc["answer"]))}


def pope_results(doc: dict, results: list[str]) -> dict:
    said = yes_no(results[0])
    return {"pope_acc": float(said == doc["answer"]), "pope_f1": (said, doc["answer"]), "pope_yes_ratio": float(said == "yes")}


def pope_f1(items: list[tuple[str | None, str]]) -> float:
    said, truth = zip(*items)
    return pope_metrics(list(said), list(truth))["pope_f1"]


def ranked_choices(doc: dict) -> list[str]:
    return doc["choices"]


def ranked_results(doc: dict, results: list) -> dict[str, float]:
    """Right when the true caption is strictly more likely, as in evaluate's ranked probes."""
    true_ll, other_ll = (_log_likelihood(result) for result in results)
    right = float(true_ll > other_ll)
    return {"rank_acc": right, f"rank_{doc['probe']}_acc": right}


def _log_likelihood(result: tuple[float, bool] | str) -> float:
    """lmms-eval 0.7.3 stores each (log-likelihood, is_greedy) answer as its str(); read it back."""
    return float((ast.literal_eval(result) if isinstance(result, str) else result)[0])
