"""prepare: caption variety, determinism, and the user's own data with clear errors for bad entries."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from revision.captions import caption, distinct_captions
from revision.sources import load_easyvqa
from stages.cli import app
from tests.helpers import edit_params


def _cli(params: Path, out: Path):
    return CliRunner().invoke(app, ["prepare", "--params", str(params), "--out", str(out), "--metrics", str(out.parent / "m.json")])


def _set(params: Path, **values) -> None:
    edit_params(params, "prepare", **values)


def test_captions_vary_in_template_and_wording():
    item = load_easyvqa("test")[0]
    rng = random.Random(0)
    captions = {caption(item, rng) for _ in range(200)}
    assert len(captions) > 30
    assert all(item.attrs["colour"] in c or "grey" in c or "blue-green" in c for c in captions)
    assert len(distinct_captions(item, 5, rng)) == 5


def test_easyvqa_attributes_agree_with_its_questions():
    for item in load_easyvqa("test")[:200]:
        for question, answer in item.questions:
            if question in ("what color is the shape?", "what is the color of the shape?"):
                assert answer == item.attrs["colour"]
            if question in ("what shape is in the image?", "what shape is present?"):
                assert answer == item.attrs["shape"]


@pytest.mark.slow  # two full prepare runs (~20 s)
def test_same_seed_same_manifests(tiny_params, tmp_path):
    for out in ("a", "b"):
        assert _cli(tiny_params, tmp_path / out).exit_code == 0
    for name in ("text_corpus", "eval", "encoder_pairs"):
        first, second = (pd.read_parquet(tmp_path / run / f"{name}.parquet") for run in ("a", "b"))
        pd.testing.assert_frame_equal(first, second)


def _image(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(path)
    return path.name


def _user_files(root: Path) -> tuple[Path, Path]:
    images = [{"id": f"u{i}", "image": _image(root / f"u{i}.png")} for i in range(3)]
    dataset = root / "dataset.json"
    dataset.write_text(json.dumps({"images": images, "texts": [{"id": "t0", "text": "a cat"}, {"id": "t1", "text": "a dog"}]}))
    records = [
        {"id": f"c{i}", "image": _image(root / f"c{i}.png"),
         "conversations": [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": f"caption {i}"}]}
        for i in range(10)
    ]
    llava = root / "llava.json"
    llava.write_text(json.dumps(records))
    return dataset, llava


def test_user_data_joins_the_splits(tiny_params, tmp_path):
    dataset, llava = _user_files(tmp_path / "user")
    _set(tiny_params, sources={}, user_dataset=str(dataset), user_llava=str(llava))
    result = _cli(tiny_params, tmp_path / "out")
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    assert pd.read_parquet(out / "text_corpus.parquet")["text"].tolist() == ["a cat", "a dog"]
    assert sorted(pd.read_parquet(out / "image_pool.parquet")["id"]) == ["u0", "u1", "u2"]
    sft, evals = json.loads((out / "sft.json").read_text()), pd.read_parquet(out / "eval.parquet")
    pairs = len(pd.read_parquet(out / "encoder_pairs.parquet")) + len(pd.read_parquet(out / "pretrain_pairs.parquet"))
    assert len(sft) + len(evals) + pairs == 10 and len(evals) == 1
    assert all((out / p).exists() for p in evals["image"])


def _break_dataset(dataset: Path, llava: Path, kind: str) -> tuple[str, str]:
    """Damage one file in one way; returns (param to set, text the error must contain)."""
    data, records = json.loads(dataset.read_text()), json.loads(llava.read_text())
    if kind == "missing_image":
        data["images"][1]["image"] = "nope.png"
        dataset.write_text(json.dumps(data))
        return "user_dataset", "images[1]: image file not found"
    if kind == "truncated_image":
        path = dataset.parent / data["images"][2]["image"]
        path.write_bytes(path.read_bytes()[:40])
        return "user_dataset", "images[2]: unreadable image"
    if kind == "empty_text":
        data["texts"][1]["text"] = "  "
        dataset.write_text(json.dumps(data))
        return "user_dataset", "texts[1]: missing or empty 'text'"
    if kind == "duplicate_id":
        data["texts"][1]["id"] = "t0"
        dataset.write_text(json.dumps(data))
        return "user_dataset", "duplicate id 't0'"
    if kind == "not_json":
        llava.write_text("[{\"id\": ")
        return "user_llava", "not valid JSON"
    if kind == "bad_speaker":
        records[3]["conversations"][1]["from"] = "assistant"
        llava.write_text(json.dumps(records))
        return "user_llava", "[3].conversations[1]: 'from' must be 'human' or 'gpt'"
    if kind == "no_answer":
        records[4]["conversations"] = records[4]["conversations"][:1]
        llava.write_text(json.dumps(records))
        return "user_llava", "[4] (id c4): 'conversations' must list at least two turns"
    raise ValueError(kind)


@pytest.mark.parametrize(
    "kind", ["missing_image", "truncated_image", "empty_text", "duplicate_id", "not_json", "bad_speaker", "no_answer"]
)
def test_bad_user_data_fails_cleanly_and_writes_nothing(tiny_params, tmp_path, kind):
    dataset, llava = _user_files(tmp_path / "user")
    param, expected = _break_dataset(dataset, llava, kind)
    _set(tiny_params, sources={}, **{param: str(dataset if param == "user_dataset" else llava)})
    out = tmp_path / "out"
    result = _cli(tiny_params, out)
    assert result.exit_code == 2
    assert expected in result.output and str(dataset if param == "user_dataset" else llava) in result.output
    assert not out.exists() and not (out.parent / f".{out.name}.tmp").exists()


def test_unknown_param_names_the_key(tiny_params, tmp_path):
    _set(tiny_params, captions_per_image=3)
    result = _cli(tiny_params, tmp_path / "out")
    assert result.exit_code == 2 and "prepare.captions_per_image" in result.output


@pytest.mark.slow  # reads the real sources before it refuses (~5 s)
def test_oversized_split_names_the_source(tiny_params, tmp_path):
    data = yaml.safe_load(tiny_params.read_text())
    data["prepare"]["sources"]["easyvqa"]["text"] = 5000
    tiny_params.write_text(yaml.safe_dump(data))
    result = _cli(tiny_params, tmp_path / "out")
    assert result.exit_code == 2 and "prepare.sources.easyvqa" in result.output


def _turns(conversation: list[dict]) -> list[tuple[str, str]]:
    return [(h["value"].removeprefix("<image>\n"), g["value"]) for h, g in zip(conversation[::2], conversation[1::2])]


@pytest.mark.slow  # two full prepare runs (~20 s)
def test_existence_questions_are_balanced_true_and_change_nothing_else(tiny_params, tmp_path):
    from revision.sources import load_fashion_mnist

    runs = {}
    for count in (0, 2):
        _set(tiny_params, existence_questions=count)
        assert _cli(tiny_params, tmp_path / str(count)).exit_code == 0
        runs[count] = json.loads((tmp_path / str(count) / "sft.json").read_text())
    for name in ("text_corpus", "eval", "encoder_pairs", "pretrain_pairs", "image_pool"):
        pd.testing.assert_frame_equal(*(pd.read_parquet(tmp_path / str(c) / f"{name}.parquet") for c in (0, 2)))
    items = load_easyvqa("train") + load_fashion_mnist("train")
    truth = {item.id: item.attrs.get("shape") or item.attrs["class_name"] for item in items}
    answers = []
    for plain, probed in zip(runs[0], runs[2]):
        assert plain["id"] == probed["id"] and probed["conversations"][0]["value"].startswith("<image>\n")
        plain_turns, added = _turns(plain["conversations"]), []
        for turn in _turns(probed["conversations"]):  # the plain turns in their order, two more in between
            if plain_turns and turn == plain_turns[0]:
                plain_turns.pop(0)
            else:
                added.append(turn)
        assert not plain_turns
        assert len(added) == 2
        for question, answer in added:
            named = question.removeprefix("Is there a ").removesuffix(" in the image?")
            assert question == f"Is there a {named} in the image?" and (named == truth[probed["id"]]) == (answer == "yes")
            answers.append(answer)
    assert answers.count("yes") == answers.count("no") == len(runs[2])
