"""The data contract between stages: where each stage writes, what the manifests are called and hold, and
which embedding sets exist. Stage commands take these as their default paths; dvc.yaml names the same paths
(``tests/test_layout.py`` checks that the two agree), so neither can move a file without the other.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from revision.errors import InputError

if TYPE_CHECKING:  # pandas is imported by the two functions that use it: stage commands' --help stays fast
    import pandas as pd

# ------------------------------------------------------------------------------------------ stage folders

DATA = Path("data")
PREPARED = DATA / "prepared"  # manifests + images/
ENCODER = DATA / "encoder"  # the frozen dual encoder
EMBEDDINGS = DATA / "embeddings"  # one embedding set per subfolder
REALIGN = DATA / "realign"  # stats.json + the aligned text set
VISUAL = DATA / "visual"  # the images as the MLLM reads them when not pooled embeddings: grid features or pixels
LM = DATA / "lm"  # the causal LM every MLLM starts from
PRETRAIN = DATA / "pretrain"  # stage-1 MLLM
FINETUNE = DATA / "finetune"  # stage-2 MLLM
CHECKPOINTS = DATA / "checkpoints"  # resumable training state (not a DVC output: dropped when a stage ends)

REPORTS = Path("reports")
REALIGN_REPORTS = REPORTS / "realign"  # gap report: metrics.json + PNG plots
EVALUATE_REPORTS = REPORTS / "evaluate"  # metrics.json + <checkpoint>.jsonl predictions


def stage_metrics(stage: str) -> Path:
    """The DVC metrics file of a stage with a flat report (prepare, encoder, embed, pretrain, finetune)."""
    return REPORTS / f"{stage}.json"


def loss_curve(stage: str) -> Path:
    """The per-step (or per-epoch) loss CSV a training stage writes as a DVC plot."""
    return REPORTS / f"{stage}_loss.csv"


REALIGN_METRICS = REALIGN_REPORTS / "metrics.json"
EVALUATE_METRICS = EVALUATE_REPORTS / "metrics.json"

# ------------------------------------------------------------------------------------------ manifests


@dataclass(frozen=True)
class Manifest:
    """A file in ``PREPARED``: one row per sample, ``id`` unique across all manifests."""

    file: str
    columns: tuple[str, ...]


LABELS = ("source", "class_name", "colour", "attrs")  # for probes; attrs is the JSON they came from
ENCODER_PAIRS = Manifest("encoder_pairs.parquet", ("id", "image", "caption", *LABELS))  # trains the dual encoder
TEXT_CORPUS = Manifest("text_corpus.parquet", ("id", "text", *LABELS))  # unpaired text: its images are nowhere
IMAGE_POOL = Manifest("image_pool.parquet", ("id", "image", *LABELS))  # unpaired images: no captions
PRETRAIN_PAIRS = Manifest("pretrain_pairs.parquet", ("id", "image", "caption", *LABELS))  # paired baseline only
SFT = Manifest("sft.json", ("id", "image", "conversations"))  # LLaVA JSON
EVAL = Manifest("eval.parquet", ("id", "image", "captions", "questions", *LABELS))  # questions: JSON list
MANIFESTS = (ENCODER_PAIRS, TEXT_CORPUS, IMAGE_POOL, PRETRAIN_PAIRS, SFT, EVAL)
IMAGES_DIR = "images"  # manifest image paths are relative to PREPARED and lie under this folder


def positions(ids: list[str], where: str | Path, name_row=lambda row: f"row {row}") -> dict[str, int]:
    """Row of each id; a repeated id is an ``InputError`` naming ``where`` and both rows."""
    position: dict[str, int] = {}
    for row, id_ in enumerate(ids):
        if id_ in position:
            raise InputError(f"{where}: {name_row(row)}: duplicate id {id_!r} (first at {name_row(position[id_])})")
        position[id_] = row
    return position


def write_manifest(prepared: Path, manifest: Manifest, rows: list[dict]) -> None:
    import pandas as pd

    path = prepared / manifest.file
    if path.suffix == ".json":
        path.write_text(json.dumps(rows, indent=1))
    else:
        pd.DataFrame(rows, columns=list(manifest.columns) if not rows else None).to_parquet(path, index=False)


def read_manifest(prepared: Path, manifest: Manifest, needs: tuple[str, ...] | None = None) -> pd.DataFrame:
    """The manifest as a table; a missing file, or a missing column of ``needs`` (by default all of the
    manifest's), is an ``InputError`` naming the file."""
    import pandas as pd

    path = prepared / manifest.file
    if not path.is_file():
        raise InputError(f"{path}: not found; run `revision prepare` first")
    if path.suffix == ".json":
        table = pd.DataFrame(json.loads(path.read_text()))
    else:
        table = pd.read_parquet(path)
    if table.empty:
        return pd.DataFrame(columns=list(manifest.columns))
    missing = [column for column in needs or manifest.columns if column not in table.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)}")
    return table.assign(id=table["id"].astype(str))


# ------------------------------------------------------------------------------------------ embedding sets


@dataclass(frozen=True)
class EmbeddedSet:
    """A folder of ``EMBEDDINGS``: the ``column`` of ``manifest`` through the frozen encoder, one row per id."""

    name: str
    manifest: Manifest
    column: str  # "image" for image sets; a text column otherwise
    first_item: bool = False  # the column holds lists: embed the first entry

    @property
    def modality(self) -> str:
        return "image" if self.column == "image" else "text"


TEXT = EmbeddedSet("text", TEXT_CORPUS, "text")
IMAGE_POOL_IMAGES = EmbeddedSet("image_pool", IMAGE_POOL, "image")
PRETRAIN_IMAGES = EmbeddedSet("pretrain_images", PRETRAIN_PAIRS, "image")
EVAL_IMAGES = EmbeddedSet("eval_images", EVAL, "image")
SFT_IMAGES = EmbeddedSet("sft_images", SFT, "image")
EVAL_TEXT = EmbeddedSet("eval_text", EVAL, "captions", first_item=True)  # same ids as EVAL_IMAGES
# The encoder split is not embedded: the encoder stage trains on it and nothing downstream reads it.
EMBEDDED_SETS = (TEXT, IMAGE_POOL_IMAGES, PRETRAIN_IMAGES, EVAL_IMAGES, SFT_IMAGES, EVAL_TEXT)

VISUAL_SETS = (PRETRAIN_IMAGES, SFT_IMAGES, EVAL_IMAGES)  # under VISUAL, same names and ids: what an MLLM reads
VISUAL_RECORD = "visual_input.json"  # under VISUAL: the visual input it was written for

ALIGNED_TEXT = "aligned_text"  # under REALIGN: TEXT mapped by the fitted alignment, same ids and order
