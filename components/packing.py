"""Token rows on disk: documents packed into fixed-length rows, written as parquet list columns.

A row file has a column `tokens` (list<uint16>, or list<uint32> for a vocabulary past 65,536
ids; every row block_size + 1 long) and, for fine-tuning rows, `mask` (list<int8>, 1 where
the token is a target that carries loss). Readers widen the ids to int64 themselves.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from components import storage
from components.tokenizer import EOT_ID, eot_id


def row_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned type that holds every id: uint16 up to 65,536 tokens (GPT-2's 50,257 fits)."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def pack_rows(docs_token_ids: Iterable[Sequence[int]], block_size: int, dtype=np.int32, eot: int = EOT_ID) -> np.ndarray:
    """Concatenate documents (each followed by the EOT id `eot`) and cut into training rows.

    Rows are block_size + 1 long so that inputs are row[:-1] and targets row[1:].
    The copy is per document (numpy copies each list), never per token in Python.

    Returns:
        (N, block_size + 1) array of `dtype`; the incomplete tail is dropped.
    """
    docs = [np.asarray(ids, dtype=dtype) for ids in docs_token_ids]
    lengths = np.fromiter((len(d) + 1 for d in docs), dtype=np.int64, count=len(docs))  # +1: the EOT
    stream = np.full(int(lengths.sum()), eot, dtype=dtype)
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1])) if len(docs) else lengths
    for start, ids in zip(starts, docs):
        stream[start : start + len(ids)] = ids  # the EOT after each document is already in place
    row_len = block_size + 1
    n_rows = len(stream) // row_len
    return stream[: n_rows * row_len].reshape(n_rows, row_len)  # (N, block_size + 1)


def encode_and_pack(texts: list[str], tokenizer, block_size: int, dtype) -> tuple[np.ndarray, int]:
    """Tokenize a batch of documents with one batched call and pack them into rows.

    Packing is per batch: the tail of the batch that does not fill a row (fewer than
    block_size + 1 tokens) is dropped rather than carried into the next batch, so batches
    stay independent and run in any order on any node. With the data stage's batches of
    several MB of text that loses well under 0.1% of the tokens (the manifest counts it).

    Returns:
        rows (N, block_size + 1) of `dtype`, and the batch's tokens before packing (one EOT
        per document included).
    """
    encodings = tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    ids = [e.ids for e in encodings]
    return pack_rows(ids, block_size, dtype, eot_id(tokenizer)), sum(len(x) + 1 for x in ids)


def rows_table(tokens: np.ndarray, mask: np.ndarray | None = None) -> pa.Table:
    """(N, L) token rows, and their loss mask if given, as a table of list columns."""
    columns = {"tokens": _list_column(tokens, pa.from_numpy_dtype(tokens.dtype))}
    if mask is not None:
        columns["mask"] = _list_column(mask, pa.int8())
    return pa.table(columns)


def write_rows(location: str | Path, tokens: np.ndarray, mask: np.ndarray | None = None) -> None:
    """Write (N, L) token rows, and their loss mask if given, as one parquet file (path or storage URI).

    The file appears whole or not at all (`storage.write_bytes`), so a task that is retried
    rewrites it and a reader never sees half of it.
    """
    sink = pa.BufferOutputStream()
    pq.write_table(rows_table(tokens, mask), sink)
    storage.write_bytes(str(location), sink.getvalue().to_pybytes())


def _list_column(rows: np.ndarray, value_type: pa.DataType) -> pa.Array:
    """(N, L) array -> list<value_type> column without a Python loop per row."""
    n, length = rows.shape
    assert n * length < 2**31, "list<> offsets are int32; shard the split instead"
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * length, type=pa.int32())
    return pa.ListArray.from_arrays(offsets, pa.array(rows.reshape(-1), type=value_type))
