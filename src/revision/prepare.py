"""Disjoint splits of the bundled (and the user's) data, written as the manifests of ``revision.layout``
(file names and columns are defined there), with every kept image under ``images/``."""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from revision.captions import CAPTION_PROMPTS, caption, distinct_captions, existence_questions, questions
from revision.config import PrepareConfig, SplitSizes
from revision.errors import InputError
from revision.layout import (
    ENCODER_PAIRS,
    EVAL,
    IMAGE_POOL,
    IMAGES_DIR,
    MANIFESTS,
    PRETRAIN_PAIRS,
    SFT,
    TEXT_CORPUS,
    Manifest,
    write_manifest,
)
from revision.sources import Item, load_easyvqa, load_fashion_mnist
from revision.userdata import read_llava, read_revision_dataset

SPLITS = ("encoder", "text", "image_pool", "pretrain", "sft")


def _labels(item: Item) -> dict:
    return {
        "source": item.source,
        "class_name": item.attrs.get("class_name"),
        "colour": item.attrs.get("colour"),
        "attrs": json.dumps(item.attrs, sort_keys=True),
    }


def _load_pools(source: str) -> tuple[list[Item], list[Item]]:
    if source == "easyvqa":
        return load_easyvqa("train"), load_easyvqa("test")
    return load_fashion_mnist("train"), load_fashion_mnist("t10k")


def split_source(source: str, sizes: SplitSizes, rng: random.Random) -> dict[str, list[Item]]:
    """Shuffle the source's train pool once and cut it into disjoint splits; eval comes from its test pool."""
    train, test = _load_pools(source)
    need = sum(getattr(sizes, s) for s in SPLITS)
    if need > len(train):
        raise InputError(f"params.yaml: prepare.sources.{source}: splits need {need} train images, {len(train)} exist")
    if sizes.eval > len(test):
        raise InputError(f"params.yaml: prepare.sources.{source}.eval: {sizes.eval} > {len(test)} test images")
    rng.shuffle(train)
    rng.shuffle(test)
    splits, start = {}, 0
    for name in SPLITS:
        n = getattr(sizes, name)
        splits[name] = train[start : start + n]
        start += n
    splits["eval"] = test[: sizes.eval]
    return splits


@dataclass(frozen=True)
class Existence:
    """POPE-style questions for one SFT item: how many, its row in the split (which balances yes and no), and
    the generator that picks the absent objects and where the questions go."""

    count: int
    row: int
    rng: random.Random


def _conversation(item: Item, rng: random.Random, existence: Existence | None = None) -> list[dict[str, str]]:
    """Caption request and questions in random order, plus the ``existence`` questions at random places; the
    image token leads the first human turn."""
    turns = [(rng.choice(CAPTION_PROMPTS), caption(item, rng))]
    qas = questions(item, rng)
    turns += [(qa["question"], qa["answer"]) for qa in rng.sample(qas, min(2, len(qas)))]
    rng.shuffle(turns)
    if existence:
        for turn in existence_questions(item, existence.count, existence.row, existence.rng):
            turns.insert(existence.rng.randint(0, len(turns)), turn)
    conv = []
    for i, (question, answer) in enumerate(turns):
        prefix = "<image>\n" if i == 0 else ""
        conv += [{"from": "human", "value": prefix + question}, {"from": "gpt", "value": answer}]
    return conv


def build_tables(splits: dict[str, list[Item]], cfg: PrepareConfig, rng: random.Random) -> dict:
    """Manifest rows (image paths relative to the output folder) for bundled items."""
    img = lambda item: f"{IMAGES_DIR}/{item.id}.png"  # noqa: E731
    tables: dict[Manifest, list] = {manifest: [] for manifest in MANIFESTS}
    for item in splits["encoder"]:
        tables[ENCODER_PAIRS].append({"id": item.id, "image": img(item), "caption": caption(item, rng), **_labels(item)})
    for item in splits["text"]:
        for k, text in enumerate(distinct_captions(item, cfg.captions_per_text_image, rng)):
            tables[TEXT_CORPUS].append({"id": f"txt-{item.id}-{k}", "text": text, **_labels(item)})
    for item in splits["image_pool"]:
        tables[IMAGE_POOL].append({"id": item.id, "image": img(item), **_labels(item)})
    for item in splits["pretrain"]:
        tables[PRETRAIN_PAIRS].append({"id": item.id, "image": img(item), "caption": caption(item, rng), **_labels(item)})
    existence_rng = random.Random(f"{cfg.seed}-existence")  # its own draws: every other row stays as it was
    for row, item in enumerate(splits["sft"]):
        existence = Existence(cfg.existence_questions, row, existence_rng) if cfg.existence_questions else None
        tables[SFT].append({"id": item.id, "image": img(item), "conversations": _conversation(item, rng, existence)})
    for item in splits["eval"]:
        tables[EVAL].append({
            "id": item.id, "image": img(item),
            "captions": distinct_captions(item, cfg.eval_captions, rng),
            "questions": json.dumps(questions(item, rng)),
            **_labels(item),
        })
    return tables


def _user_labels(source: str) -> dict:
    return {"source": source, "class_name": None, "colour": None, "attrs": "{}"}


def _claim_ids(owners: dict[str, str], ids: list[str], entries: str) -> None:
    """Record ``entries[row]`` as the owner of each id; an id someone already owns is an error naming both."""
    for row, id_ in enumerate(ids):
        entry = f"{entries}[{row}]"
        if id_ in owners:
            raise InputError(f"{entry}: duplicate id {id_!r}, already used by {owners[id_]}")
        owners[id_] = entry


def add_user_data(tables: dict, images_dir: Path, cfg: PrepareConfig, rng: random.Random) -> None:
    """Append the user's dataset.json (unpaired) and LLaVA JSON (paired conversations) to the tables."""
    owners = {row["id"]: f"the bundled {manifest.file} split" for manifest, rows in tables.items() for row in rows}
    if cfg.user_dataset:
        images, texts = read_revision_dataset(cfg.user_dataset)
        _claim_ids(owners, [image.id for image in images], f"{cfg.user_dataset}: images")
        _claim_ids(owners, [text["id"] for text in texts], f"{cfg.user_dataset}: texts")
        for image in images:
            tables[IMAGE_POOL].append({"id": image.id, "image": _copy_image(image.path, image.id, images_dir), **_user_labels("user")})
        for text in texts:
            tables[TEXT_CORPUS].append({**text, **_user_labels("user")})
    if cfg.user_llava:
        records = read_llava(cfg.user_llava)
        _claim_ids(owners, [r["id"] for r in records], f"{cfg.user_llava}: ")
        rng.shuffle(records)
        n_eval = max(1, round(len(records) * cfg.user_eval_fraction))
        n_pairs = round(len(records) * cfg.user_pairs_fraction)
        for i, r in enumerate(records):
            image = _copy_image(r["image"], r["id"], images_dir)
            labels = _user_labels("user")
            if i < n_eval:
                tables[EVAL].append({"id": r["id"], "image": image, "captions": [r["caption"]], "questions": "[]", **labels})
            elif i < n_eval + n_pairs:
                table = ENCODER_PAIRS if i % 2 else PRETRAIN_PAIRS
                tables[table].append({"id": r["id"], "image": image, "caption": r["caption"], **labels})
            else:
                tables[SFT].append({"id": r["id"], "image": image, "conversations": r["conversations"]})


def _copy_image(src: Path, image_id: str, images_dir: Path) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in image_id)
    dest = images_dir / f"{safe}{src.suffix.lower() or '.png'}"
    if dest.exists():  # distinct ids such as 'a b' and 'a_b' must not overwrite each other's image
        raise InputError(f"{src}: id {image_id!r} gives the file name {dest.name} that another id already took")
    shutil.copyfile(src, dest)
    return f"{IMAGES_DIR}/{dest.name}"


def _check_unique_ids(tables: dict[Manifest, list]) -> None:
    owners: dict[str, str] = {}
    for manifest, rows in tables.items():
        _claim_ids(owners, [row["id"] for row in rows], manifest.file)


def prepare(cfg: PrepareConfig, out: Path) -> dict[str, int]:
    """Write every manifest into ``out`` (an empty folder); returns row counts per manifest."""
    rng = random.Random(cfg.seed)
    images_dir = out / IMAGES_DIR
    images_dir.mkdir(parents=True)
    tables: dict[Manifest, list] = {manifest: [] for manifest in MANIFESTS}
    for source, sizes in sorted(cfg.sources.items()):
        splits = split_source(source, sizes, random.Random(f"{cfg.seed}-{source}"))
        for manifest, rows in build_tables(splits, cfg, rng).items():
            tables[manifest].extend(rows)
        for name in ("encoder", "image_pool", "pretrain", "sft", "eval"):
            for item in splits[name]:
                item.image().save(images_dir / f"{item.id}.png")
    add_user_data(tables, images_dir, cfg, rng)
    _check_unique_ids(tables)
    for manifest, rows in tables.items():
        write_manifest(out, manifest, rows)
    return {Path(manifest.file).stem: len(rows) for manifest, rows in tables.items()}


def distinct_corpus_texts(out: Path) -> int:
    """How many different strings the unpaired text corpus holds (a templated corpus repeats itself)."""
    return int(pd.read_parquet(out / TEXT_CORPUS.file, columns=["text"])["text"].nunique())
