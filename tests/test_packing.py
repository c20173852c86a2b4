"""Tests for components/packing.py: rows from token streams, and their parquet layout."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from components.packing import encode_and_pack, pack_rows, row_dtype, write_rows
from components.tokenizer import train_tokenizer
from components.train import rows_from_arrow
from tests.corpora import sample_text


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


def test_rows_are_as_narrow_as_the_vocabulary():
    assert row_dtype(4096) == np.uint16 and row_dtype(50_257) == np.uint16 and row_dtype(2**16) == np.uint16
    assert row_dtype(2**16 + 1) == np.uint32
    rows = pack_rows([[65_535, 1], [2]], block_size=2, dtype=np.uint16)
    assert rows.dtype == np.uint16 and rows.tolist() == [[65_535, 1, 0]]


def test_encode_and_pack_one_batched_call(tmp_path):
    tok = train_tokenizer([sample_text(i) for i in range(3)], 300)
    texts = [sample_text(0), sample_text(1)]
    rows, n_tokens = encode_and_pack(texts, tok, block_size=15, dtype=np.uint16)
    expected = [len(tok.encode(t, add_special_tokens=False).ids) + 1 for t in texts]
    assert n_tokens == sum(expected) and rows.shape == (n_tokens // 16, 16) and rows.dtype == np.uint16
    assert rows[0].tolist() == tok.encode(texts[0], add_special_tokens=False).ids[:16]
    write_rows(str(tmp_path / "rows.parquet"), rows)
    table = pq.read_table(tmp_path / "rows.parquet")
    assert table.schema.field("tokens").type == pa.list_(pa.uint16())
    assert rows_from_arrow(table)["tokens"].tolist() == rows.tolist()
    assert rows_from_arrow(table)["tokens"].dtype == np.int64
