"""Tests for components/packing.py: rows from token streams, and their parquet layout."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from components.packing import pack_rows, write_rows


def test_pack_rows():
    rows = pack_rows([[1, 2, 3], [4, 5], [6, 7, 8, 9]], block_size=3)
    # stream: 1 2 3 0 4 5 0 6 7 8 9 0 -> 3 rows of 4
    assert rows.dtype == np.int32
    assert rows.tolist() == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]]
    assert pack_rows([[1, 2]], block_size=8).shape == (0, 9)
    assert pack_rows([], block_size=8).shape == (0, 9)


def test_write_rows_list_columns(tmp_path):
    tokens = np.arange(12, dtype=np.int32).reshape(3, 4)
    mask = (tokens % 2).astype(np.int8)
    write_rows(tmp_path / "rows.parquet", tokens)
    write_rows(tmp_path / "pairs.parquet", tokens, mask)

    rows = pq.read_table(tmp_path / "rows.parquet")
    assert rows.schema.names == ["tokens"] and rows.schema.field("tokens").type == pa.list_(pa.int32())
    assert rows.column("tokens").to_pylist() == tokens.tolist()
    pairs = pq.read_table(tmp_path / "pairs.parquet")
    assert pairs.schema.field("mask").type == pa.list_(pa.int8())
    assert pairs.column("mask").to_pylist() == mask.tolist()
    assert not list(tmp_path.glob(".*tmp*")), "temp files must be renamed away"
    write_rows(tmp_path / "empty.parquet", np.zeros((0, 9), dtype=np.int32))
    assert pq.read_table(tmp_path / "empty.parquet").num_rows == 0
