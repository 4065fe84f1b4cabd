"""Embedding matrices on disk, read in row chunks whatever the file: ``.npy``, ``.safetensors``, ``.parquet``
or a project embedding set. Rows come out L2-normalized in float64 (``normalized_chunks``), with errors that
name the file and row; nothing is memory-mapped, so memory stays flat however many rows there are.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from revision.embedding_sets import EmbeddingSet
from revision.errors import InputError


@dataclass(frozen=True)
class Chunk:
    """Raw rows from one file; ``row`` counts within the whole source, ``file_row`` within ``file``."""

    file: Path
    file_row: int
    row: int
    values: np.ndarray


class EmbeddingSource:
    """A matrix of embeddings on disk, read in row chunks. ``encoder`` is None where the file records none."""

    path: Path
    dim: int
    count: int
    encoder: dict | None = None

    def chunks(self, chunk_rows: int) -> Iterator[Chunk]:
        raise NotImplementedError


class RawRowsSource(EmbeddingSource):
    """Row-major numbers at a byte offset of a file, read with plain reads (no memory map, so no page of
    the file stays in this process's resident set)."""

    def __init__(self, path: Path, offset: int, dtype: np.dtype, count: int, dim: int):
        self.path, self.offset, self.dtype, self.count, self.dim = path, offset, np.dtype(dtype), count, dim

    def chunks(self, chunk_rows: int) -> Iterator[Chunk]:
        """Chunks read into one reused buffer: each chunk's values are valid until the next is asked for."""
        row_bytes = self.dim * self.dtype.itemsize
        buffer = memoryview(bytearray(min(chunk_rows, self.count) * row_bytes))
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            for start in range(0, self.count, chunk_rows):
                rows = min(chunk_rows, self.count - start)
                if handle.readinto(buffer[:rows * row_bytes]) != rows * row_bytes:
                    raise InputError(f"{self.path}: file is truncated")
                values = np.frombuffer(buffer[:rows * row_bytes], dtype=self.dtype).reshape(rows, self.dim)
                yield Chunk(self.path, start, start, values)


class NpySource(RawRowsSource):
    def __init__(self, path: Path):
        try:
            with open(path, "rb") as handle:
                version = np.lib.format.read_magic(handle)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
                else:
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
                offset = handle.tell()
        except (ValueError, OSError) as err:
            raise InputError(f"{path}: not a readable .npy file: {err}") from None
        if len(shape) != 2:
            raise InputError(f"{path}: expected a 2-D array (rows x dim), got shape {shape}")
        _check_numeric(dtype, path)
        if fortran and shape[0] > 1 and shape[1] > 1:
            raise InputError(f"{path}: Fortran-ordered array; save it with np.ascontiguousarray first")
        super().__init__(path, offset, dtype, shape[0], shape[1])


SAFETENSORS_DTYPES = {"F16": "<f2", "F32": "<f4", "F64": "<f8", "BF16": "<u2", "I8": "i1", "I16": "<i2",
                      "I32": "<i4", "I64": "<i8", "U8": "u1"}


class SafetensorsSource(RawRowsSource):
    """Tensor ``embeddings`` (or the only tensor) of a .safetensors file, streamed from the header's offsets."""

    def __init__(self, path: Path):
        header_len, tensors = self._read_header(path)
        name = "embeddings" if "embeddings" in tensors else next(iter(tensors)) if len(tensors) == 1 else None
        if name is None:
            raise InputError(f"{path}: no tensor named 'embeddings' among {sorted(tensors)}")
        info = tensors[name]
        shape, dtype, offsets = info.get("shape"), info.get("dtype"), info.get("data_offsets")
        if not (isinstance(offsets, list) and len(offsets) == 2):
            raise InputError(f"{path}: tensor '{name}' has no valid data_offsets")
        begin, end = offsets
        if not isinstance(shape, list) or len(shape) != 2:
            raise InputError(f"{path}: tensor '{name}' has shape {shape}, expected rows x dim")
        if dtype not in SAFETENSORS_DTYPES:
            raise InputError(f"{path}: tensor '{name}' has unsupported dtype {dtype}")
        if end - begin != shape[0] * shape[1] * np.dtype(SAFETENSORS_DTYPES[dtype]).itemsize:
            raise InputError(f"{path}: tensor '{name}' data size does not match its shape {shape}")
        self.bfloat16 = dtype == "BF16"
        super().__init__(path, 8 + header_len + begin, SAFETENSORS_DTYPES[dtype], shape[0], shape[1])

    @staticmethod
    def _read_header(path: Path) -> tuple[int, dict]:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            header_len = int.from_bytes(handle.read(8), "little")
            if size < 8 or header_len > size - 8:
                raise InputError(f"{path}: not a safetensors file (bad header length)")
            try:
                header = json.loads(handle.read(header_len))
            except ValueError:
                raise InputError(f"{path}: not a safetensors file (header is not JSON)") from None
        if not isinstance(header, dict):
            raise InputError(f"{path}: not a safetensors file (header is not a mapping)")
        return header_len, {k: v for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}

    def chunks(self, chunk_rows: int) -> Iterator[Chunk]:
        for chunk in super().chunks(chunk_rows):
            if self.bfloat16:  # bfloat16 is the top half of a float32
                values = (chunk.values.astype(np.uint32) << 16).view(np.float32)
                chunk = Chunk(chunk.file, chunk.file_row, chunk.row, values)
            yield chunk


class ParquetSource(EmbeddingSource):
    """One list/array column (or, failing that, every numeric column except ``id``), read batch by batch."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.file = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as err:
            raise InputError(f"{path}: not a readable parquet file: {err}") from None
        schema = self.file.schema_arrow
        self.count = self.file.metadata.num_rows
        lists = [f.name for f in schema if pa.types.is_list(f.type) or pa.types.is_large_list(f.type)
                 or pa.types.is_fixed_size_list(f.type)]
        if len(lists) > 1:
            preferred = [n for n in lists if n in ("embedding", "embeddings", "vector")]
            if len(preferred) != 1:
                raise InputError(f"{path}: several list columns {lists}; name the embedding column 'embedding'")
            lists = preferred
        if lists:
            self.columns, self.list_column = lists, True
            self.dim = self._list_dim(schema.field(lists[0]).type)
        else:
            self.columns = [f.name for f in schema if f.name != "id"
                            and (pa.types.is_integer(f.type) or pa.types.is_floating(f.type))]
            self.list_column, self.dim = False, len(self.columns)
            if not self.columns:
                raise InputError(f"{path}: no list column and no numeric columns to read embeddings from")

    def _list_dim(self, list_type) -> int:
        if pa.types.is_fixed_size_list(list_type):
            return list_type.list_size
        if self.count == 0:
            return 0
        first = next(self.file.iter_batches(batch_size=1, columns=self.columns)).column(0)
        return len(first[0]) if first[0].is_valid else 0

    def chunks(self, chunk_rows: int) -> Iterator[Chunk]:
        start = 0
        for batch in self.file.iter_batches(batch_size=chunk_rows, columns=self.columns):
            values = self._list_values(batch.column(0), start) if self.list_column else np.column_stack(
                [batch.column(i).to_numpy(zero_copy_only=False) for i in range(batch.num_columns)]
            ).astype(np.float64)
            yield Chunk(self.path, start, start, values)
            start += batch.num_rows

    def _list_values(self, column: pa.Array, start: int) -> np.ndarray:
        lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
        wrong = np.flatnonzero(np.isnan(lengths.astype(float)) | (lengths != self.dim))
        if len(wrong):
            row = start + int(wrong[0])
            raise InputError(f"{self.path}: row {row} has {_len_text(lengths[wrong[0]])} values, expected {self.dim}")
        flat = column.flatten().to_numpy(zero_copy_only=False)
        return np.asarray(flat, dtype=np.float64).reshape(len(column), self.dim)


def _len_text(length) -> str:
    return "no" if length is None or np.isnan(float(length)) else str(int(length))


class ProjectSetSource(EmbeddingSource):
    """A project embedding directory (index.json + shards), read shard by shard."""

    def __init__(self, path: Path):
        self.set = EmbeddingSet(path)
        self.path, self.dim, self.count, self.encoder = Path(path), self.set.dim, self.set.count, self.set.encoder

    def chunks(self, chunk_rows: int) -> Iterator[Chunk]:
        for file, first_row, vectors in self.set.iter_shards():
            if vectors.ndim != 2 or vectors.shape[1] != self.dim:
                raise InputError(f"{file}: shard has shape {vectors.shape}, index.json says dim {self.dim}")
            for offset in range(0, len(vectors), chunk_rows):
                yield Chunk(file, offset, first_row + offset, vectors[offset:offset + chunk_rows])


def _check_numeric(dtype: np.dtype, path: Path) -> None:
    if dtype.kind not in "fiu":
        raise InputError(f"{path}: dtype {dtype} is not a real number type")


def open_embeddings(path: str | Path) -> EmbeddingSource:
    """Open ``.npy``, ``.safetensors``, ``.parquet`` or a project embedding directory."""
    path = Path(path)
    if path.is_dir():
        return ProjectSetSource(path)
    if not path.exists():
        raise InputError(f"{path}: not found")
    readers = {".npy": NpySource, ".safetensors": SafetensorsSource, ".parquet": ParquetSource}
    if path.suffix not in readers:
        raise InputError(f"{path}: unknown embedding file type; use .npy, .safetensors, .parquet or a project dir")
    return readers[path.suffix](path)


def _describe_row(chunk: Chunk, index: int, source: EmbeddingSource) -> str:
    where = f"{chunk.file}: row {chunk.file_row + index}"
    if chunk.file != source.path:
        where += f" (row {chunk.row + index} of {source.path})"
    return where


def checked_chunks(
    source: EmbeddingSource, chunk_rows: int, dtype: type = np.float64
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield (first row, rows as ``dtype``, their L2 norms); a non-finite or zero-norm row is an InputError.
    Callers that only need weighted sums of the unit rows can skip dividing by the norms.

    The rows live in a buffer reused for every chunk (fresh multi-MB arrays per chunk cost page faults), the
    source's own where it already holds ``dtype``: they are the caller's to change, and valid until the next
    chunk is asked for. A chunk whose norms are
    bad in ``dtype`` is redone in float64 (a float32 norm overflows long before float64's) and comes out so.
    """
    seen, buffer = 0, np.empty((0, source.dim), dtype=dtype)
    for chunk in source.chunks(chunk_rows):
        values = np.asarray(chunk.values)
        if values.ndim != 2 or values.shape[1] != source.dim:
            raise InputError(f"{chunk.file}: rows of width {values.shape[-1]}, expected {source.dim}")
        if values.dtype == dtype and values.flags.writeable:
            x = values
        else:
            if len(values) > len(buffer):
                buffer = np.empty((len(values), source.dim), dtype=dtype)
            x = buffer[:len(values)]
            x[...] = values
        norms = _row_norms(x)
        if not (np.isfinite(norms) & (norms > 0)).all():
            x = values.astype(np.float64)
            norms = _checked_norms(x, chunk, source)
        yield chunk.row, x, norms
        seen += len(x)
    if seen != source.count:
        raise InputError(f"{source.path}: read {seen} rows but its header says {source.count}")


def _row_norms(x: np.ndarray) -> np.ndarray:
    if x.dtype == np.float64:
        return np.sqrt(np.einsum("ij,ij->i", x, x))
    return np.linalg.norm(x, axis=1)  # pairwise sums: einsum's float32 accumulation loses ~3x more


def _checked_norms(x: np.ndarray, chunk: Chunk, source: EmbeddingSource) -> np.ndarray:
    norms = _row_norms(x)
    bad = np.flatnonzero(~(np.isfinite(norms) & (norms > 0)))
    if len(bad):
        i = int(bad[0])
        problem = "has non-finite values" if not np.isfinite(x[i]).all() else (
            "has zero norm" if norms[i] == 0 else "has a norm that overflows")
        raise InputError(f"{_describe_row(chunk, i, source)} {problem}; embeddings must be finite and non-zero")
    return norms


def normalized_chunks(source: EmbeddingSource, chunk_rows: int) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (first row, rows L2-normalized in float64, valid until the next chunk); a non-finite or zero-norm
    row is an InputError."""
    for first_row, x, norms in checked_chunks(source, chunk_rows):
        x /= norms[:, None]
        yield first_row, x


def gather_rows(source: EmbeddingSource, rows: np.ndarray, chunk_rows: int) -> np.ndarray:
    """Normalized rows at the (sorted, unique) indices ``rows``, in one streamed pass."""
    rows = np.asarray(rows, dtype=np.int64)
    out = np.empty((len(rows), source.dim))
    for first_row, x in normalized_chunks(source, chunk_rows):
        lo, hi = np.searchsorted(rows, [first_row, first_row + len(x)])
        out[lo:hi] = x[rows[lo:hi] - first_row]
    return out


def sample_rows(count: int, size: int, seed: int) -> np.ndarray:
    """Sorted seeded subset of ``range(count)`` (everything when ``size >= count``)."""
    if size >= count:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, size=size, replace=False))
