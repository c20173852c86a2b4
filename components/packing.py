"""Token rows on disk: documents packed into fixed-length rows, written as parquet list columns.

A row file has a column `tokens` (list<int32>, every row block_size + 1 long) and, for
fine-tuning rows, `mask` (list<int8>, 1 where the token is a target that carries loss).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from components.files import atomic_write
from components.tokenizer import EOT_ID


def pack_rows(docs_token_ids: Iterable[list[int]], block_size: int) -> np.ndarray:
    """Concatenate documents (each followed by EOT) and cut into training rows.

    Rows are block_size + 1 long so that inputs are row[:-1] and targets row[1:].

    Returns:
        int32 array (N, block_size + 1); the incomplete tail is dropped.
    """
    eot = np.array([EOT_ID], dtype=np.int32)
    pieces = []
    for ids in docs_token_ids:
        pieces.append(np.asarray(ids, dtype=np.int32))
        pieces.append(eot)
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    row_len = block_size + 1
    n_rows = len(stream) // row_len
    return stream[: n_rows * row_len].reshape(n_rows, row_len)  # (N, block_size + 1)


def write_rows(path: Path, tokens: np.ndarray, mask: np.ndarray | None = None) -> None:
    """Write (N, L) token rows, and their loss mask if given, as one parquet file, atomically."""
    columns = {"tokens": _list_column(tokens, pa.int32())}
    if mask is not None:
        columns["mask"] = _list_column(mask, pa.int8())
    table = pa.table(columns)
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def _list_column(rows: np.ndarray, value_type: pa.DataType) -> pa.Array:
    """(N, L) array -> list<value_type> column without a Python loop per row."""
    n, length = rows.shape
    assert n * length < 2**31, "list<> offsets are int32; shard the split instead"
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * length, type=pa.int32())
    return pa.ListArray.from_arrays(offsets, pa.array(rows.reshape(-1), type=value_type))
