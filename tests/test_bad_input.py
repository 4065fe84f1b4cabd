"""Every kind of bad input the pipeline refuses, in one table, through the real CLI.

Each case breaks one input of one stage. A refusal always means: exit code 2, one line on stderr naming the
offending file and the row, entry or key, and no output left behind (neither the output path nor its
temporary sibling ``.<name>.tmp``). Inputs are small copies of the tiny pipeline's outputs, never the
originals.

Covered elsewhere and not repeated here:

- prepare, dataset.json: missing and truncated image, empty text, duplicate text id; LLaVA JSON: not JSON,
  bad speaker, a single turn: tests/test_prepare.py::test_bad_user_data_fails_cleanly_and_writes_nothing
- prepare: unknown params key: tests/test_prepare.py::test_unknown_param_names_the_key
- realign on unreadable files (junk .npy / .safetensors, ragged parquet), zero-norm rows, stats files with a
  wrong vector length: tests/test_realign.py ("errors" section)
- chat on a missing image file: tests/test_pipeline.py::test_chat_answers_from_stage1_and_final_checkpoints
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from safetensors.numpy import save_file
from typer.testing import CliRunner

from revision.config import load_stage_config
from revision.embedding_sets import EmbeddingSet
from revision.training_data import subsample
from stages.cli import app
from tests.helpers import edit_params

pytestmark = pytest.mark.slow  # every case copies its inputs from the tiny pipeline (tiny_repo)

OTHER_ENCODER = "another-encoder"


@dataclass
class Env:
    """Where a case builds its broken inputs, and the tiny pipeline (read only) it copies them from."""

    tmp: Path
    repo: Path
    request: pytest.FixtureRequest  # for the fixtures only some cases need

    def data(self, *parts: str) -> Path:
        return self.repo / "data" / Path(*parts)


@dataclass
class Broken:
    args: list[str]  # the command line after `revision`
    file: Path  # the file (or folder) the message must name
    where: str  # the row, entry or key the message must name
    outputs: list[Path] = field(default_factory=list)  # must not exist afterwards, nor their temporary siblings


def tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


# ---------------------------------------------------------------- prepare: the user's own files


def write_image(path: Path) -> str:
    """A noise PNG: its compressed data spans many bytes, so cutting the file leaves a valid header."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)).save(path)
    return path.name


def truncate(image: Path) -> None:
    image.write_bytes(image.read_bytes()[: image.stat().st_size * 3 // 4])


def user_dataset(env: Env) -> tuple[Path, dict]:
    root = env.tmp / "user"
    data = {
        "images": [{"id": f"u{i}", "image": write_image(root / f"u{i}.png")} for i in range(3)],
        "texts": [{"id": "t0", "text": "a cat"}, {"id": "t1", "text": "a dog"}],
    }
    return root / "dataset.json", data


def user_llava(env: Env) -> tuple[Path, list]:
    root = env.tmp / "user"
    records = [
        {"id": f"c{i}", "image": write_image(root / f"c{i}.png"),
         "conversations": [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": f"caption {i}"}]}
        for i in range(6)
    ]
    return root / "llava.json", records


def run_prepare(env: Env, file: Path, where: str, **user_files: Path) -> Broken:
    """prepare on the user's files only (``user_dataset=...``, ``user_llava=...``)."""
    params = edit_params(env.request.getfixturevalue("tiny_params"), "prepare", sources={},
                         **{key: str(path) for key, path in user_files.items()})
    out, metrics = env.tmp / "prepared", env.tmp / "prepare.json"
    return Broken(["prepare", "--params", str(params), "--out", str(out), "--metrics", str(metrics)], file, where, [out, metrics])


def broken_llava(env: Env, row: int, damage: Callable[[dict, Path], None]) -> Broken:
    path, records = user_llava(env)
    damage(records[row], path.parent)
    path.write_text(json.dumps(records))
    return run_prepare(env, path, f"[{row}]", user_llava=path)


def broken_dataset(env: Env, where: str, damage: Callable[[dict, Path], None]) -> Broken:
    path, data = user_dataset(env)
    damage(data, path.parent)
    path.write_text(json.dumps(data))
    return run_prepare(env, path, where, user_dataset=path)


def llava_image_missing(env: Env) -> Broken:
    """A LLaVA record names an image file that is not there."""
    return broken_llava(env, 2, lambda record, root: record.update(image="gone.png"))


def llava_image_truncated(env: Env) -> Broken:
    """A LLaVA record's PNG lost its last quarter."""
    return broken_llava(env, 1, lambda record, root: truncate(root / record["image"]))


def dataset_image_corrupt(env: Env) -> Broken:
    """A dataset.json image file holds bytes that are no image at all."""
    return broken_dataset(env, "images[2]", lambda data, root: (root / data["images"][2]["image"]).write_bytes(b"GIF? no"))


def llava_empty_answer(env: Env) -> Broken:
    """A LLaVA answer (the caption) is blank."""
    return broken_llava(env, 3, lambda record, root: record["conversations"][1].update(value="  "))


def llava_record_not_an_object(env: Env) -> Broken:
    """A LLaVA record is a bare string instead of an object."""
    path, records = user_llava(env)
    records[4] = records[4]["image"]
    path.write_text(json.dumps(records))
    return run_prepare(env, path, "[4]", user_llava=path)


def llava_turn_without_value(env: Env) -> Broken:
    """A LLaVA turn has no 'value'."""
    return broken_llava(env, 0, lambda record, root: record["conversations"][0].pop("value"))


def dataset_not_json(env: Env) -> Broken:
    """dataset.json stops in the middle of a value."""
    path, _ = user_dataset(env)
    path.write_text('{"images": [{"id": "u0",\n "image": ')
    return run_prepare(env, path, "line 2", user_dataset=path)


def dataset_texts_not_a_list(env: Env) -> Broken:
    """dataset.json's 'texts' is an object, not a list."""
    return broken_dataset(env, "'texts'", lambda data, root: data.update(texts={"t0": "a cat"}))


def dataset_image_entry_not_an_object(env: Env) -> Broken:
    """A dataset.json image entry is a bare file name."""
    path, data = user_dataset(env)
    data["images"][1] = data["images"][1]["image"]
    path.write_text(json.dumps(data))
    return run_prepare(env, path, "images[1]", user_dataset=path)


def llava_duplicate_id(env: Env) -> Broken:
    """Two LLaVA records share an id."""
    return broken_llava(env, 4, lambda record, root: record.update(id="c1"))


def id_in_both_user_files(env: Env) -> Broken:
    """A LLaVA record reuses the id of a dataset.json image."""
    dataset, data = user_dataset(env)
    dataset.write_text(json.dumps(data))
    llava, records = user_llava(env)
    taken = records[0]["id"] = data["images"][0]["id"]
    llava.write_text(json.dumps(records))
    where = f"[0]: duplicate id {taken!r}, already used by {dataset}: images[0]"
    return run_prepare(env, llava, where, user_dataset=dataset, user_llava=llava)


def ids_with_one_file_name(env: Env) -> Broken:
    """Two distinct image ids ('a b', 'a_b') that would be copied to the same file name."""
    path, data = user_dataset(env)
    data["images"][0]["id"], data["images"][1]["id"] = "a b", "a_b"
    path.write_text(json.dumps(data))
    return run_prepare(env, path.parent / data["images"][1]["image"], "'a_b'", user_dataset=path)


# ---------------------------------------------------------------- embed: a prepared folder


def small_prepared(env: Env, rows: int = 4) -> Path:
    """The first ``rows`` of every manifest of the tiny pipeline, with just their images."""
    source, dest = env.data("prepared"), env.tmp / "prepared"
    (dest / "images").mkdir(parents=True)
    images = []
    for manifest in source.glob("*.parquet"):
        table = pd.read_parquet(manifest).head(rows)
        table.to_parquet(dest / manifest.name, index=False)
        images += table["image"].tolist() if "image" in table else []
    sft = json.loads((source / "sft.json").read_text())[:rows]
    (dest / "sft.json").write_text(json.dumps(sft))
    for image in images + [record["image"] for record in sft]:
        shutil.copy(source / image, dest / image)
    return dest


def run_embed(env: Env, prepared: Path, file: Path, where: str) -> Broken:
    out, metrics = env.tmp / "data" / "embeddings", env.tmp / "reports" / "embed.json"
    args = ["embed", "--params", str(env.repo / "params.yaml"), "--prepared", str(prepared),
            "--encoder-dir", str(env.data("encoder")), "--out", str(out), "--metrics", str(metrics)]
    return Broken(args, file, where, [out, metrics])


def manifest_image_missing(env: Env) -> Broken:
    """An image_pool row's image file was deleted from the prepared folder."""
    prepared = small_prepared(env)
    (prepared / pd.read_parquet(prepared / "image_pool.parquet")["image"][1]).unlink()
    return run_embed(env, prepared, prepared / "image_pool.parquet", "row 1")


def manifest_image_truncated(env: Env) -> Broken:
    """An SFT record's image file lost its last quarter."""
    prepared = small_prepared(env)
    truncate(prepared / json.loads((prepared / "sft.json").read_text())[2]["image"])
    return run_embed(env, prepared, prepared / "sft.json", "row 2")


def manifest_duplicate_id(env: Env) -> Broken:
    """Two image_pool rows share an id."""
    prepared = small_prepared(env)
    table = pd.read_parquet(prepared / "image_pool.parquet")
    table.loc[2, "id"] = table["id"][1]
    table.to_parquet(prepared / "image_pool.parquet", index=False)
    return run_embed(env, prepared, prepared / "image_pool.parquet", "row 2")


# ---------------------------------------------------------------- embedding sets read by later stages


def copy_set(env: Env, name: str, folder: str = "embeddings") -> Path:
    return Path(shutil.copytree(env.data(folder, name), env.tmp / folder / name))


def poison_last_row(set_dir: Path, value: float) -> tuple[Path, str]:
    """Overwrite the set's last row with ``value``; returns its shard file and how a message locates the row."""
    *_, (shard, first_row, vectors) = EmbeddingSet(set_dir).iter_shards()
    vectors = vectors.copy()
    vectors[-1] = value
    save_file({"embeddings": vectors}, str(shard))
    return shard, f"row {len(vectors) - 1} (row {first_row + len(vectors) - 1} of {set_dir})"


def retag(set_dir: Path) -> Path:
    """Make the set claim another encoder made it."""
    index = json.loads((set_dir / "index.json").read_text())
    index["encoder"]["id"] = OTHER_ENCODER
    (set_dir / "index.json").write_text(json.dumps(index))
    return set_dir


def rename_id(set_dir: Path, row: int, new_id: str) -> None:
    ids = pd.read_parquet(set_dir / "ids.parquet")
    ids.loc[row, "id"] = new_id
    ids.to_parquet(set_dir / "ids.parquet", index=False)


def save_npy(env: Env, name: str, vectors: np.ndarray) -> Path:
    np.save(env.tmp / name, vectors)
    return env.tmp / name


def text_with_inf(env: Env) -> tuple[Path, str]:
    vectors = EmbeddingSet(env.data("embeddings", "text")).load()
    vectors[7, 0] = np.inf
    return save_npy(env, "text_inf.npy", vectors), "row 7"


# ---------------------------------------------------------------- realign


def run_realign_pipeline(env: Env, file: Path, where: str) -> Broken:
    """The pipeline mode on copies of the four sets it reads (a case has already broken one of them)."""
    embeddings = env.tmp / "embeddings"
    for name in ("text", "image_pool", "eval_text", "eval_images"):
        if not (embeddings / name).exists():
            copy_set(env, name)
    out, reports = env.tmp / "data" / "realign", env.tmp / "reports" / "realign"
    args = ["realign", "--params", str(env.repo / "params.yaml"), "--embeddings", str(embeddings),
            "--prepared", str(env.data("prepared")), "--out", str(out), "--reports", str(reports)]
    return Broken(args, file, where, [out, reports])


def run_realign_apply(env: Env, text: Path, file: Path, where: str) -> Broken:
    out = env.tmp / "applied"
    args = ["realign", "--apply", str(env.data("realign", "stats.json")), "--text-embeddings", str(text), "--output-dir", str(out)]
    return Broken(args, file, where, [out])


def realign_pipeline_nan(env: Env) -> Broken:
    """The pipeline's text set has a NaN row."""
    return run_realign_pipeline(env, *poison_last_row(copy_set(env, "text"), np.nan))


def realign_standalone_inf(env: Env) -> Broken:
    """A standalone fit on a .npy with an inf."""
    text, row = text_with_inf(env)
    out = env.tmp / "fitted"
    args = ["realign", "--text-embeddings", str(text), "--image-embeddings", str(env.data("embeddings", "image_pool")),
            "--output-dir", str(out)]
    return Broken(args, text, row, [out])


def realign_apply_inf(env: Env) -> Broken:
    """Fitted stats applied to a .npy with an inf (found while writing the output)."""
    text, row = text_with_inf(env)
    return run_realign_apply(env, text, text, row)


def realign_apply_other_dim(env: Env) -> Broken:
    """Fitted stats applied to text of another dimension."""
    dim = json.loads(env.data("realign", "stats.json").read_text())["dim"]
    text = save_npy(env, "wide.npy", np.ones((5, dim + 1), np.float32))
    return run_realign_apply(env, text, text, f"dim {dim + 1} ")


def realign_apply_other_encoder(env: Env) -> Broken:
    """Fitted stats applied to text another encoder made."""
    text = retag(copy_set(env, "text"))
    return run_realign_apply(env, text, text, OTHER_ENCODER)


def realign_pipeline_other_encoder(env: Env) -> Broken:
    """The image pool comes from another encoder than the text."""
    images = retag(copy_set(env, "image_pool"))
    return run_realign_pipeline(env, images, OTHER_ENCODER)


def realign_text_id_unknown(env: Env) -> Broken:
    """A text embedding's id is in no row of the prepared text corpus."""
    rename_id(copy_set(env, "text"), 0, "ghost")
    return run_realign_pipeline(env, env.data("prepared", "text_corpus.parquet"), "'ghost'")


def realign_eval_unpaired(env: Env) -> Broken:
    """The eval captions are not in the order of the eval images."""
    text = copy_set(env, "eval_text")
    ids = pd.read_parquet(text / "ids.parquet")
    ids.iloc[[0, 1]] = ids.iloc[[1, 0]].to_numpy()
    ids.to_parquet(text / "ids.parquet", index=False)
    return run_realign_pipeline(env, text, "row 0 ")


# ---------------------------------------------------------------- pretrain, finetune, evaluate, chat


def kept_rows(env: Env, stage: str, manifest_rows: int) -> list[int]:
    """The manifest rows the stage trains on (its seeded subsample)."""
    cfg = load_stage_config(stage, env.repo / "params.yaml")
    return subsample(manifest_rows, cfg.max_samples, cfg.seed)


def run_training(env: Env, stage: str, *inputs: str) -> tuple[list[str], list[Path]]:
    out, metrics, loss = env.tmp / "data" / stage, env.tmp / "reports" / f"{stage}.json", env.tmp / "reports" / f"{stage}_loss.csv"
    args = [stage, "--params", str(env.repo / "params.yaml"), *inputs, "--out", str(out), "--metrics", str(metrics),
            "--loss-plot", str(loss), "--checkpoints", str(env.tmp / "checkpoints")]
    return args, [out, metrics, loss]


def run_pretrain(env: Env, realign: Path, file: Path, where: str) -> Broken:
    args, outputs = run_training(env, "pretrain", "--prepared", str(env.data("prepared")), "--realign", str(realign),
                                 "--embeddings", str(env.data("embeddings")), "--lm-dir", str(env.data("lm")))
    return Broken(args, file, where, outputs)


def run_finetune(env: Env, embeddings: Path, file: Path, where: str) -> Broken:
    args, outputs = run_training(env, "finetune", "--prepared", str(env.data("prepared")), "--embeddings", str(embeddings),
                                 "--pretrained", str(env.data("pretrain")))
    return Broken(args, file, where, outputs)


def pretrain_aligned_nan(env: Env) -> Broken:
    """The aligned text that stage 1 trains on has a NaN row."""
    return run_pretrain(env, env.tmp / "realign", *poison_last_row(copy_set(env, "aligned_text", "realign"), np.nan))


def pretrain_text_without_embedding(env: Env) -> Broken:
    """A text-corpus row the stage trains on has no aligned embedding (its id is gone from the set)."""
    aligned = copy_set(env, "aligned_text", "realign")
    row = kept_rows(env, "pretrain", EmbeddingSet(aligned).count)[-1]  # the set keeps the corpus's row order
    rename_id(aligned, row, "ghost")
    return run_pretrain(env, env.tmp / "realign", env.data("prepared", "text_corpus.parquet"), f"row {row}: id ")


def finetune_images_inf(env: Env) -> Broken:
    """The SFT image embeddings have an inf row."""
    return run_finetune(env, env.tmp / "embeddings", *poison_last_row(copy_set(env, "sft_images"), np.inf))


def finetune_record_without_embedding(env: Env) -> Broken:
    """An SFT record the stage trains on has no image embedding."""
    images = copy_set(env, "sft_images")
    row = kept_rows(env, "finetune", EmbeddingSet(images).count)[-1]  # the set keeps sft.json's record order
    rename_id(images, row, "ghost")
    return run_finetune(env, env.tmp / "embeddings", env.data("prepared", "sft.json"), f"row {row}: id ")


def finetune_duplicate_embedding_id(env: Env) -> Broken:
    """Two rows of the SFT image embeddings share an id."""
    images = copy_set(env, "sft_images")
    rename_id(images, 1, pd.read_parquet(images / "ids.parquet")["id"][0])
    return run_finetune(env, env.tmp / "embeddings", images / "ids.parquet", "row 1: duplicate id")


def finetune_other_encoder(env: Env) -> Broken:
    """The SFT image embeddings come from another encoder than the stage-1 checkpoint's."""
    images = retag(copy_set(env, "sft_images"))
    return run_finetune(env, env.tmp / "embeddings", images, OTHER_ENCODER)


def run_evaluate(env: Env, embeddings: Path, file: Path, where: str) -> Broken:
    predictions = env.tmp / "reports" / "evaluate"
    args = ["evaluate", "--params", str(env.repo / "params.yaml"), "--prepared", str(env.data("prepared")),
            "--embeddings", str(embeddings), "--checkpoints", str(env.data("pretrain")),
            "--metrics", str(predictions / "metrics.json"), "--predictions", str(predictions)]
    return Broken(args, file, where, [predictions])


def evaluate_other_encoder(env: Env) -> Broken:
    """The eval image embeddings come from another encoder than the checkpoint's."""
    images = retag(copy_set(env, "eval_images"))
    return run_evaluate(env, env.tmp / "embeddings", images, OTHER_ENCODER)


def evaluate_images_nan(env: Env) -> Broken:
    """The eval image embeddings have a NaN row."""
    return run_evaluate(env, env.tmp / "embeddings", *poison_last_row(copy_set(env, "eval_images"), np.nan))


def run_chat(env: Env, image: Path, encoder_dir: Path, file: Path, where: str) -> Broken:
    args = ["chat", "--image", str(image), "--checkpoint", str(env.data("pretrain")), "--encoder-dir", str(encoder_dir)]
    return Broken(args, file, where)


def chat_other_encoder(env: Env) -> Broken:
    """chat with an encoder folder other than the one the checkpoint was trained on."""
    encoder = Path(shutil.copytree(env.data("encoder"), env.tmp / "encoder"))
    meta = json.loads((encoder / "encoder.json").read_text())
    meta["identity"]["id"] = OTHER_ENCODER
    (encoder / "encoder.json").write_text(json.dumps(meta))
    image = next(env.data("prepared", "images").glob("*.png"))
    return run_chat(env, image, encoder, env.data("pretrain"), OTHER_ENCODER)


def chat_image_corrupt(env: Env) -> Broken:
    """chat on a file that is no image."""
    image = env.tmp / "photo.png"
    image.write_bytes(b"\x89PNG but not really")
    return run_chat(env, image, env.data("encoder"), image, "unreadable image")


# ---------------------------------------------------------------- params.yaml


def params_with(env: Env, stage: str, key: str, value) -> Path:
    return edit_params(env.repo / "params.yaml", stage, env.tmp / "broken_params.yaml", **{key: value})


def run_with_params(env: Env, stage: str, key: str, value) -> Broken:
    params = params_with(env, stage, key, value)
    out = env.tmp / "data" / stage
    return Broken([stage, "--params", str(params), "--out", str(out)], params, f"{stage}.{key}", [out])


def pretrain_lr_not_a_number(env: Env) -> Broken:
    """pretrain.lr: fast"""
    return run_with_params(env, "pretrain", "lr", "fast")


def pretrain_unknown_key(env: Env) -> Broken:
    """pretrain.learning_rate (the key is lr)"""
    return run_with_params(env, "pretrain", "learning_rate", 0.01)


def embed_batch_size_not_an_integer(env: Env) -> Broken:
    """embed.batch_size: many"""
    return run_with_params(env, "embed", "batch_size", "many")


def embed_unknown_key(env: Env) -> Broken:
    """embed.shards (the key is shard_size)"""
    return run_with_params(env, "embed", "shards", 10)


# ---------------------------------------------------------------- the catalogue

CATALOGUE = [
    # kind of bad input              how it is broken (a builder above)     what the message says is wrong
    ("missing image file",           llava_image_missing,                   "image file not found"),
    ("missing image file",           manifest_image_missing,                "image file not found"),
    ("truncated image",              llava_image_truncated,                 "image file is truncated"),
    ("truncated image",              manifest_image_truncated,              "image file is truncated"),
    ("corrupt image",                dataset_image_corrupt,                 "cannot identify image file"),
    ("corrupt image",                chat_image_corrupt,                    "cannot identify image file"),
    ("empty caption",                llava_empty_answer,                    "missing or empty 'value'"),
    ("malformed LLaVA JSON",         llava_record_not_an_object,            "expected an object, got str"),
    ("malformed LLaVA JSON",         llava_turn_without_value,              "missing or empty 'value'"),
    ("malformed dataset.json",       dataset_not_json,                      "not valid JSON"),
    ("malformed dataset.json",       dataset_texts_not_a_list,              "expected an object with 'images' and 'texts' lists"),
    ("malformed dataset.json",       dataset_image_entry_not_an_object,     "expected an object, got str"),
    ("duplicate ids",                llava_duplicate_id,                    "duplicate id 'c1' (first at [1])"),
    ("duplicate ids",                id_in_both_user_files,                 "already used by"),
    ("duplicate ids",                ids_with_one_file_name,                "another id already took"),
    ("duplicate ids",                manifest_duplicate_id,                 "duplicate id"),
    ("duplicate ids",                finetune_duplicate_embedding_id,       "(first at row 0)"),
    ("unknown ids",                  pretrain_text_without_embedding,       "has no embedding in"),
    ("unknown ids",                  finetune_record_without_embedding,     "has no embedding in"),
    ("unknown ids",                  realign_text_id_unknown,               "no row for id"),
    ("unknown ids",                  realign_eval_unpaired,                 "is not paired with row 0"),
    ("non-finite embeddings",        realign_pipeline_nan,                  "has non-finite values"),
    ("non-finite embeddings",        realign_standalone_inf,                "has non-finite values"),
    ("non-finite embeddings",        realign_apply_inf,                     "has non-finite values"),
    ("non-finite embeddings",        pretrain_aligned_nan,                  "has non-finite values"),
    ("non-finite embeddings",        finetune_images_inf,                   "has non-finite values"),
    ("non-finite embeddings",        evaluate_images_nan,                   "has non-finite values"),
    ("dimension mismatch",           realign_apply_other_dim,               "was fitted at dim"),
    ("encoder mismatch",             realign_apply_other_encoder,           "from encoder"),
    ("encoder mismatch",             realign_pipeline_other_encoder,        "from encoder"),
    ("encoder mismatch",             finetune_other_encoder,                "from encoder"),
    ("encoder mismatch",             evaluate_other_encoder,                "from encoder"),
    ("encoder mismatch",             chat_other_encoder,                    "from encoder"),
    ("unknown params key",           pretrain_unknown_key,                  "Extra inputs are not permitted"),
    ("unknown params key",           embed_unknown_key,                     "Extra inputs are not permitted"),
    ("wrongly typed params value",   pretrain_lr_not_a_number,              "valid number"),
    ("wrongly typed params value",   embed_batch_size_not_an_integer,       "valid integer"),
]


def case_id(case) -> str:
    values = case.values if hasattr(case, "values") else case
    return values[1].__name__


def error_line(result) -> str:
    """The one line the CLI prints for bad input (progress bars may share stderr; a traceback may not)."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


@pytest.mark.parametrize("kind, build, problem", CATALOGUE, ids=[case_id(case) for case in CATALOGUE])
def test_bad_input_exits_2_naming_file_and_entry_and_writes_nothing(
    kind, build, problem, tiny_repo, tmp_path, request, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # MLflow's artifact store lands in the working folder
    broken = build(Env(tmp_path, tiny_repo, request))
    result = CliRunner().invoke(app, broken.args)
    assert result.exit_code == 2, f"{kind}: {result.output}\n{result.exception!r}"
    message = error_line(result)
    assert str(broken.file) in message, message
    assert broken.where in message, message
    assert problem in message, message
    for output in broken.outputs:
        assert not output.exists(), output
        assert not tmp_sibling(output).exists(), tmp_sibling(output)
