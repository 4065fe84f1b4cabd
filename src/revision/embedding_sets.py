"""The project's embedding format: a directory of safetensors shards plus ids and an index.

```
<dir>/index.json            {"format", "encoder": {...identity...}, "dim", "count", "shards": [...]}
<dir>/ids.parquet           one column ``id``, in row order
<dir>/shard-00000.safetensors   tensor ``embeddings`` (rows x dim, float32, L2-normalized)
```
A set of grid features (``revision.feature_maps``) has ``"tokens": g²`` in its index: each row is g² tokens of dim / g²
channels, row-major, not normalized.
Every set records the encoder that made it, so mixing two encoders' embeddings is an error.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from revision.encoder_identity import require_same_encoder
from revision.errors import InputError
from revision.layout import positions

FORMAT = "revision-embeddings/1"


@dataclass(frozen=True)
class Shard:
    file: str
    rows: int


class EmbeddingWriter:
    """Append (ids, vectors) batches; full shards go to disk as they fill. Call ``close`` to finish.

    ``done_ids`` resumes an interrupted writer: the ids of the rows already on disk as full shards
    (see ``complete_shard_rows``).
    """

    def __init__(
        self, directory: str | Path, encoder: dict, dim: int, shard_size: int = 4096, done_ids: list[str] = (), tokens: int = 1
    ):
        if len(done_ids) % shard_size:
            raise ValueError(f"{len(done_ids)} finished rows are not whole shards of {shard_size}")
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.encoder, self.dim, self.shard_size, self.tokens = encoder, dim, shard_size, tokens
        self.ids: list[str] = list(done_ids)
        self.shards = [Shard(_shard_name(i), shard_size) for i in range(len(done_ids) // shard_size)]
        self._buffer: list[np.ndarray] = []
        self._buffered = 0

    def add(self, ids: list[str], vectors: np.ndarray) -> None:
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim or len(ids) != len(vectors):
            raise ValueError(f"expected {len(ids)} x {self.dim} vectors, got {vectors.shape}")
        self.ids.extend(ids)
        self._buffer.append(vectors)
        self._buffered += len(vectors)
        while self._buffered >= self.shard_size:
            self._flush(self.shard_size)

    def _flush(self, rows: int) -> None:
        block = np.concatenate(self._buffer) if self._buffer else np.zeros((0, self.dim), np.float32)
        head, rest = block[:rows], block[rows:]
        name = _shard_name(len(self.shards))
        tmp = self.dir / f".{name}.tmp"  # a shard file on disk is always whole, even if the process dies
        save_file({"embeddings": np.ascontiguousarray(head)}, str(tmp))
        os.replace(tmp, self.dir / name)
        self.shards.append(Shard(name, len(head)))
        self._buffer, self._buffered = ([rest] if len(rest) else []), len(rest)

    def close(self) -> dict:
        if self._buffered:
            self._flush(self._buffered)
        positions(self.ids, self.dir / "ids.parquet")
        pd.DataFrame({"id": self.ids}).to_parquet(self.dir / "ids.parquet", index=False)
        index = {
            "format": FORMAT,
            "encoder": self.encoder,
            "dim": self.dim,
            "count": len(self.ids),
            "shards": [s.__dict__ for s in self.shards],
        } | ({"tokens": self.tokens} if self.tokens != 1 else {})
        (self.dir / "index.json").write_text(json.dumps(index, indent=2) + "\n")
        return index


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def complete_shard_rows(directory: str | Path, shard_size: int) -> int:
    """Rows an interrupted writer left in ``directory`` as consecutive full shards (the rest is discarded)."""
    directory = Path(directory)
    shards = 0
    while (directory / _shard_name(shards)).exists():
        with safe_open(str(directory / _shard_name(shards)), "np") as shard:
            if shard.get_slice("embeddings").get_shape()[0] != shard_size:
                break
        shards += 1
    for leftover in directory.glob("shard-*.safetensors"):
        if int(leftover.stem.split("-")[1]) >= shards:
            leftover.unlink()
    return shards * shard_size


class EmbeddingSet:
    """Read side of the format: metadata up front, vectors streamed shard by shard."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        index_path = self.dir / "index.json"
        if not index_path.exists():
            raise InputError(f"{index_path}: not found; is {self.dir} an embedding directory?")
        index = json.loads(index_path.read_text())
        if index.get("format") != FORMAT:
            raise InputError(f"{index_path}: unknown format {index.get('format')!r}")
        self.encoder: dict = index["encoder"]
        self.dim: int = index["dim"]
        self.count: int = index["count"]
        self.shards = [Shard(**s) for s in index["shards"]]
        self.tokens: int = index.get("tokens", 1)  # >1: each row is a grid of tokens (revision.feature_maps)

    def __len__(self) -> int:
        return self.count

    def ids(self) -> list[str]:
        return pd.read_parquet(self.dir / "ids.parquet")["id"].astype(str).tolist()

    def iter_shards(self) -> Iterator[tuple[Path, int, np.ndarray]]:
        """Yield (file, first row index, vectors) per shard."""
        start = 0
        for shard in self.shards:
            path = self.dir / shard.file
            vectors = load_file(str(path))["embeddings"]
            yield path, start, vectors
            start += len(vectors)

    def load(self) -> np.ndarray:
        """Every vector; a NaN or inf row (it would turn any loss into NaN) is an error naming its shard."""
        shards = []
        for path, first_row, vectors in self.iter_shards():
            bad = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
            if len(bad):
                row = int(bad[0])
                raise InputError(f"{path}: row {row} (row {first_row + row} of {self.dir}) has non-finite values")
            shards.append(vectors)
        return np.concatenate(shards) if shards else np.zeros((0, self.dim), np.float32)


def check_same_encoder(*sets: EmbeddingSet) -> dict:
    """All sets must come from one encoder; returns its identity."""
    first = sets[0]
    for other in sets[1:]:
        require_same_encoder(other.encoder, other.dir, first.encoder, first.dir, "re-embed both with one encoder")
    return first.encoder
