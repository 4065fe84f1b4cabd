"""The eval scorers on constructed predictions, and `revision evaluate` end to end on a tiny MLLM."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import typer
import yaml
from typer.testing import CliRunner

from revision.checkpoints import save_mllm
from revision.errors import InputError
from revision.evaluate import (
    RANKED_PROBES,
    CaptionScorer,
    EvalImage,
    EvalSet,
    Question,
    answer_matches,
    derangement,
    garment_named,
    normalize_answer,
    pope_metrics,
    ranked_probe,
    swapped_captions,
    vqa_accuracy,
    yes_no,
)
from revision.mllm import MLLMConfig
from revision.visual_input import PooledInput
from stages import evaluate
from tests.helpers import tiny_mllm, write_embedding_set

EMBED_DIM = 16
ENCODER = {"id": "enc-test", "kind": "lit", "name": "tiny", "dim": EMBED_DIM}


# ---------------------------------------------------------------- scorers


def test_normalize_answer_drops_case_punctuation_and_spacing():
    assert normalize_answer("  A  T-shirt, Top! ") == "a t shirt top"


@pytest.mark.parametrize(
    "prediction, answer, expected",
    [
        ("Red.", "red", True),
        ("red circle", "red", True),  # starts with the answer as a whole word
        ("reddish", "red", False),  # ... but not as part of a word
        ("the shape is red", "red", False),
        ("  BLUE-green!", "blue-green", True),
        ("Ankle boot", "ankle boot", True),
        ("", "red", False),
    ],
)
def test_answer_matches(prediction, answer, expected):
    assert answer_matches(prediction, answer) is expected


def test_yes_no_reads_the_first_word_only():
    assert [yes_no(t) for t in ("Yes, there is.", "no", "NO!", "maybe yes", "yesterday", "")] == [
        "yes", "no", "no", None, None, None,
    ]


def test_vqa_accuracy_overall_and_per_type():
    questions = [Question(0, "vqa", "q", a, t) for a, t in [("red", "colour"), ("blue", "colour"), ("yes", "yes_no")]]
    metrics = vqa_accuracy(questions, ["Red", "green", "yes it is"])
    assert metrics == pytest.approx({
        "vqa_acc": 2 / 3, "vqa_acc_se": (2 / 9 / 3) ** 0.5, "vqa_acc_colour": 0.5, "vqa_acc_colour_se": 0.5 / 2**0.5,
        "n_vqa_colour": 2, "vqa_acc_yes_no": 1.0, "vqa_acc_yes_no_se": 0.0, "n_vqa_yes_no": 1,
    })
    assert vqa_accuracy([], []) == {}


def test_pope_metrics_on_a_known_confusion():
    truth = ["yes", "yes", "yes", "no", "no", "no"]
    predicted = ["yes", "yes", "no", "yes", "no", None]  # None: neither yes nor no, always wrong
    metrics = pope_metrics(predicted, truth)
    se = {name: metrics.pop(f"{name}_se") for name in ("pope_acc", "pope_precision", "pope_recall", "pope_f1", "pope_yes_ratio")}
    assert metrics == pytest.approx({
        "pope_acc": 0.5, "pope_precision": 2 / 3, "pope_recall": 2 / 3, "pope_f1": 2 / 3, "pope_yes_ratio": 0.5,
    })
    # shares over the probes (6), over the "yes" answers (3) and over the true shapes (3); F1 by resampling probes
    assert se["pope_acc"] == pytest.approx((0.25 / 6) ** 0.5) and se["pope_yes_ratio"] == pytest.approx((0.25 / 6) ** 0.5)
    assert se["pope_precision"] == pytest.approx((2 / 9 / 3) ** 0.5) == se["pope_recall"]
    assert 0.1 < se["pope_f1"] < 0.5
    always_no = pope_metrics(["no"] * 4, ["yes", "no", "yes", "no"])
    assert always_no["pope_f1"] == 0.0 and always_no["pope_acc"] == 0.5 and always_no["pope_yes_ratio"] == 0.0


@pytest.mark.parametrize(
    "caption, expected",
    [
        ("A dark ankle boot.", "ankle boot"),
        ("A short boot, centered.", "ankle boot"),
        ("A boot.", None),  # "boot" alone is no class's paraphrase
        ("Product photo: a pale t-shirt top.", "t-shirt"),  # not "shirt"
        ("This is a long-sleeved shirt.", "shirt"),
        ("A photo of a pair of pants.", "trouser"),
        ("A grey handbag", "bag"),
        ("Two running shoes", "sneaker"),  # plural
        ("A teal circle", None),  # "tee" only as a whole word
        ("", None),
    ],
)
def test_garment_named_prefers_the_longest_paraphrase(caption, expected):
    assert garment_named(caption) == expected


def test_caption_metrics_rank_a_perfect_caption_above_a_wrong_one():
    references = {
        "a": ["A small red circle in the middle.", "A red circle at the center of the image."],
        "b": ["A large blue triangle on the left.", "There is a big blue triangle on the left side."],
        "c": ["A dark ankle boot.", "A photo of a black ankle boot."],
    }
    perfect = {key: refs[0] for key, refs in references.items()}
    # A line break inside a caption must not shift the others onto the wrong image.
    wrong = {"a": "A dog\nplaying in the park.", "b": "Some text about a car.", "c": "Nothing to see."}
    with CaptionScorer(("bleu4", "rouge_l", "cider")) as scorer:
        good, bad = scorer.score(perfect, references), scorer.score(wrong, references)
    assert set(good) == {"bleu4", "rouge_l", "cider", "bleu4_se", "rouge_l_se", "cider_se"}
    for metric in ("bleu4", "rouge_l", "cider"):
        assert good[metric] > bad[metric], metric
    assert bad["cider_se"] > 0 and good["bleu4_se"] == pytest.approx(0.0, abs=1e-9)  # every perfect caption scores 1
    assert good["bleu4"] == pytest.approx(1.0)


# ---------------------------------------------------------------- grounding and ranked probes


def test_swapped_captions_change_the_attribute_alone():
    phrases = RANKED_PROBES["garment"][2]
    candidates = swapped_captions("A photo of a dark knit pullover, filling the frame.", "pullover", phrases)
    assert len(candidates) == len(phrases) == 10
    assert candidates[list(phrases).index("coat")] == "A photo of a dark coat, filling the frame."
    assert candidates[list(phrases).index("pullover")] == "A photo of a dark pullover, filling the frame."
    assert candidates[list(phrases).index("trouser")] == "A photo of a dark pair of trousers, filling the frame."
    colours = RANKED_PROBES["colour"][2]
    swapped = swapped_captions("An orange disc.", "orange", {"orange": ["orange"], "red": ["red"]})
    assert swapped == ["An orange disc.", "A red disc."]
    by_colour = dict(zip(colours, swapped_captions("A small blue-green box on the left.", "teal", colours)))
    assert by_colour["teal"] == "A small teal box on the left." and by_colour["red"] == "A small red box on the left."
    shapes = dict(zip(RANKED_PROBES["shape"][2], swapped_captions("Three-sided shape, blue.", "triangle", RANKED_PROBES["shape"][2])))
    assert shapes["circle"] == "Circle, blue."
    assert swapped_captions("A photo of a dark coat.", "bag", phrases) is None


def test_derangement_gives_every_caption_another_image():
    for n in (2, 3, 40):
        order = derangement(n, seed=0)
        assert sorted(order) == list(range(n)) and all(i != j for i, j in enumerate(order))
    assert derangement(40, seed=0) == derangement(40, seed=0) != derangement(40, seed=1)


def test_answer_scores_sum_what_forward_averages(tiny_lm_dir):
    model = tiny_mllm(tiny_lm_dir, EMBED_DIM, visual_tokens=2, encoder=ENCODER).eval()
    conversations = [[{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": text}]
                     for text in ("A red circle.", "A large blue triangle on the left side.")]
    vectors = torch.randn(2, EMBED_DIM)
    sums, counts, _ = model.answer_scores(vectors, conversations)
    assert counts[1] > counts[0] > 0
    with torch.no_grad():
        mean = float(model(vectors, conversations).loss)
        alone = float(model(vectors[1:], conversations[1:]).loss)
    assert float(sums.sum() / counts.sum()) == pytest.approx(mean, rel=1e-5)
    assert float(sums[1] / counts[1]) == pytest.approx(alone, rel=1e-5)


class ReadsTheVector:
    """Stands in for an MLLM: a caption is likely when it names the colour coded in the image vector."""

    config = MLLMConfig(visual=PooledInput(dim=2, tokens=1))
    colours = ("red", "blue")

    def conversation(self, question, answer):
        return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]

    def answer_scores(self, vectors, conversations):
        named = [self.colours[int(v[0] > 0)] for v in vectors]
        sums = [0.0 if f" {colour} " in conv[1]["value"] else 5.0 for colour, conv in zip(named, conversations)]
        return torch.tensor(sums), torch.ones(len(sums), dtype=torch.long), torch.tensor([s == 0.0 for s in sums])


def test_ranked_probe_prefers_the_caption_the_model_finds_more_likely():
    images = [EvalImage(f"e{i}", "easyvqa", [f"A small {c} circle."], {"colour": c, "shape": "circle"})
              for i, c in enumerate(["red", "blue", "red"])]
    images.append(EvalImage("f0", "fashion_mnist", ["A dark coat."], {"class_name": "coat"}))
    vectors = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])  # the third reads "blue": wrong
    metrics, picked = ranked_probe(ReadsTheVector(), EvalSet(images, vectors, []), "colour", batch_size=3)
    assert picked[0] == "red" and picked[1] == "blue" and picked[2] != "red" and set(picked) == {0, 1, 2}
    assert metrics["n_rank_colour"] == 3.0 and metrics["rank_colour_acc"] == pytest.approx(2 / 3)
    assert metrics["rank_colour_margin"] in (pytest.approx(10 / 3), pytest.approx(5 / 3))  # 5, 5 and 0 or -5
    assert ranked_probe(ReadsTheVector(), EvalSet(images[:3], vectors[:3], []), "garment", 3)[0] == {"n_rank_garment": 0.0}
    assert ranked_probe(ReadsTheVector(), EvalSet(images, vectors, []), "colour", 3, seed=0)[1] == picked  # seeded


# ---------------------------------------------------------------- the stage end to end


def make_checkpoint(lm_dir: Path, out: Path, encoder: dict, seed: int) -> Path:
    return save_mllm(tiny_mllm(lm_dir, EMBED_DIM, visual_tokens=2, encoder=encoder, seed=seed), out)


def eval_rows() -> list[dict]:
    shapes = [("circle", "red"), ("triangle", "blue"), ("rectangle", "teal")]
    rows = [
        {
            "id": f"easyvqa-{i}", "source": "easyvqa", "class_name": shape, "colour": colour,
            "captions": [f"A {colour} {shape}.", f"There is a {colour} {shape} in the middle."],
            "questions": json.dumps([
                {"question": "what shape is in the image?", "answer": shape, "type": "shape"},
                {"question": f"what color is the {shape}?", "answer": colour, "type": "colour"},
                {"question": f"is there a {shape}?", "answer": "yes", "type": "yes_no"},
            ]),
            "attrs": json.dumps({"class_name": shape, "colour": colour, "shape": shape}),
        }
        for i, (shape, colour) in enumerate(shapes)
    ]
    rows += [
        {
            "id": f"fmnist-{i}", "source": "fashion_mnist", "class_name": cls, "colour": None,
            "captions": [f"A dark {cls}.", f"A photo of a {cls}."],
            "questions": json.dumps([{"question": "What kind of clothing item is this?", "answer": cls,
                                      "type": "garment"}]),
            "attrs": json.dumps({"class_name": cls, "tone": "dark"}),
        }
        for i, cls in enumerate(["ankle boot", "bag", "dress"])
    ]
    rows.append({"id": "user-0", "source": "user", "class_name": None, "colour": None,
                 "captions": ["A photo of my cat."], "questions": "[]", "attrs": "{}"})
    return [{**row, "image": f"images/{row['id']}.png"} for row in rows]


@pytest.fixture(scope="module")
def eval_inputs(tmp_path_factory, tiny_lm_dir) -> Path:
    root = tmp_path_factory.mktemp("eval_inputs")
    (root / "prepared").mkdir()
    rows = eval_rows()
    pd.DataFrame(rows).to_parquet(root / "prepared" / "eval.parquet", index=False)
    vectors = np.random.default_rng(0).normal(size=(len(rows), EMBED_DIM)).astype(np.float32)
    unit_vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    write_embedding_set(root / "embeddings" / "eval_images", [row["id"] for row in rows], unit_vectors, ENCODER)
    for seed, name in enumerate(["pretrain", "finetune"]):
        make_checkpoint(tiny_lm_dir, root / "checkpoints" / name, ENCODER, seed)
    params = {"evaluate": {"seed": 0, "max_images": 6, "max_questions": 2, "batch_size": 4, "max_new_tokens": 8,
                           "mixed_precision": "no"}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def run_stage(root: Path, out: Path, checkpoints: list[Path]):
    app = typer.Typer(add_completion=False)
    app.command(evaluate.NAME)(evaluate.main)
    args = ["--params", str(root / "params.yaml"), "--prepared", str(root / "prepared"),
            "--embeddings", str(root / "embeddings"), "--metrics", str(out / "evaluate" / "metrics.json"),
            "--predictions", str(out / "evaluate")]
    for checkpoint in checkpoints:
        args += ["--checkpoints", str(checkpoint)]
    return CliRunner().invoke(app, args)


@pytest.mark.slow  # generates and scores every kind of question for two checkpoints (~20 s)
def test_evaluate_stage_scores_each_checkpoint(eval_inputs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow's artifact store lands in the working folder
    checkpoints = [eval_inputs / "checkpoints" / name for name in ("pretrain", "finetune")]
    result = run_stage(eval_inputs, tmp_path, checkpoints)
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "checkpoint" in result.output and "finetune" in result.output

    metrics = json.loads((tmp_path / "evaluate" / "metrics.json").read_text())
    assert set(metrics) == {"pretrain", "finetune"}
    expected = {
        "bleu4", "meteor", "rouge_l", "cider", "caption_nll", "vqa_acc", "pope_acc", "pope_precision",
        "pope_recall", "pope_f1", "pope_yes_ratio", "garment_acc", "n_images", "n_vqa", "n_pope",
        "caption_nll_shuffled", "image_gain", "rank_garment_acc", "rank_colour_acc", "rank_shape_acc",
        "rank_garment_margin", "rank_colour_margin", "rank_shape_margin",
    }
    for scores in metrics.values():
        assert expected <= set(scores)
        assert scores["image_gain"] == pytest.approx(scores["caption_nll_shuffled"] - scores["caption_nll"])
        assert scores["image_gain"] != 0  # a random projector still makes the image change the likelihood
        ranked = scores["n_rank_garment"] + scores["n_rank_colour"]
        assert scores["n_rank_colour"] == scores["n_rank_shape"] and 5 <= ranked <= 6  # all but the user image
        per_type = {key for key in scores if key.startswith("vqa_acc_") and not key.endswith("_se")}
        assert per_type and per_type <= {f"vqa_acc_{t}" for t in ("colour", "shape", "yes_no", "garment")}
        numbers = [key for key, value in scores.items() if isinstance(value, float) and not key.startswith("n_")]
        without_error = [key for key in numbers if not key.endswith("_se") and f"{key}_se" not in scores]
        assert without_error == [], f"metrics without a standard error: {without_error}"
        assert all(scores[f"{key}_se"] is None or scores[f"{key}_se"] >= 0 for key in numbers if not key.endswith("_se"))
        assert scores["n_images"] == 6 and scores["caption_nll"] > 0 and 0 <= scores["pope_yes_ratio"] <= 1

    for name in ("pretrain", "finetune"):
        rows = [json.loads(line) for line in (tmp_path / "evaluate" / f"{name}.jsonl").read_text().splitlines()]
        kinds = [row["kind"] for row in rows]
        assert kinds.count("caption") == 6 and kinds.count("vqa") == metrics[name]["n_vqa"]
        assert kinds.count("pope") == metrics[name]["n_pope"] and metrics[name]["n_pope"] % 2 == 0
        pope = [row for row in rows if row["kind"] == "pope"]
        assert sorted({row["reference"] for row in pope}) == ["no", "yes"]
        assert all({"id", "prompt", "prediction", "correct"} <= set(row) for row in rows)
        assert all("references" in row for row in rows if row["kind"] == "caption")
        ranked = [row for row in rows if "ranked_garment" in row or "ranked_colour" in row]
        assert len(ranked) == metrics[name]["n_rank_garment"] + metrics[name]["n_rank_colour"]


def test_evaluate_refuses_a_checkpoint_of_another_encoder(eval_inputs, tiny_lm_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    other = make_checkpoint(tiny_lm_dir, tmp_path / "other", {**ENCODER, "id": "enc-other"}, seed=0)
    result = run_stage(eval_inputs, tmp_path, [eval_inputs / "checkpoints" / "pretrain", other])
    assert result.exit_code != 0 and isinstance(result.exception, InputError)
    assert "enc-other" in str(result.exception) and "enc-test" in str(result.exception)
    assert not (tmp_path / "evaluate").exists()
