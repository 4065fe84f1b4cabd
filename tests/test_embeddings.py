"""The embedding format: shards round-trip, ids stay in order, encoders never mix silently."""

from __future__ import annotations

import numpy as np
import pytest

from revision.embedding_sets import EmbeddingSet, EmbeddingWriter, check_same_encoder
from revision.errors import InputError
from tests.helpers import write_embedding_set

ENC_A = {"id": "aaaa", "kind": "lit", "name": "a", "dim": 4}
ENC_B = {"id": "bbbb", "kind": "lit", "name": "b", "dim": 4}


def _write(path, encoder, rows=23, shard_size=5, batch=4):
    vectors = np.random.default_rng(0).normal(size=(rows, 4)).astype(np.float32)
    ids = [f"id{i}" for i in range(rows)]
    write_embedding_set(path, ids, vectors, encoder, shard_size, batch)  # several adds, across shard boundaries
    return ids, vectors


def test_round_trip_across_uneven_shards(tmp_path):
    ids, vectors = _write(tmp_path / "e", ENC_A)
    emb = EmbeddingSet(tmp_path / "e")
    assert [s.rows for s in emb.shards] == [5, 5, 5, 5, 3]
    assert emb.ids() == ids and emb.count == 23 and emb.encoder == ENC_A
    np.testing.assert_array_equal(emb.load(), vectors)
    starts = [start for _, start, _ in emb.iter_shards()]
    assert starts == [0, 5, 10, 15, 20]


def test_duplicate_ids_are_an_error(tmp_path):
    writer = EmbeddingWriter(tmp_path / "e", ENC_A, 4)
    writer.add(["x", "y", "x"], np.zeros((3, 4)))
    with pytest.raises(InputError, match=r"row 2: duplicate id 'x' \(first at row 0\)"):
        writer.close()


def test_mixing_encoders_is_an_error(tmp_path):
    _write(tmp_path / "a", ENC_A)
    _write(tmp_path / "b", ENC_B)
    a, b = EmbeddingSet(tmp_path / "a"), EmbeddingSet(tmp_path / "b")
    assert check_same_encoder(a, a) == ENC_A
    with pytest.raises(InputError, match="from encoder bbbb"):
        check_same_encoder(a, b)


def test_not_an_embedding_dir_names_the_file(tmp_path):
    with pytest.raises(InputError, match="index.json: not found"):
        EmbeddingSet(tmp_path)
