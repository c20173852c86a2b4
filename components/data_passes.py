"""The data stage's three passes over the corpus, one call per group of files.

Each pass is a pure function of one item (a group of files) that returns an Arrow table, so
the driver (`components.data.prepare_data`) can run it in this process or hand it to Ray Data
(`pipelines/data_prep.py`), which runs the groups on every CPU of every node:

    scan_group    -> one row per document: doc_id, content hash, UTF-8 size; problems
                     (its items are several groups each, `scan_items`: it is cheap per byte)
    sample_group  -> the texts of the tokenizer's sample
    pack_group    -> tokenizes and packs the group's kept documents, writes one shard per
                     split to the output location, and returns what it wrote and the
                     group's first validation texts (for `heldout_text.jsonl`)

A group is a few MB of files (a big file is a group of its own), so a pass spreads over as
many CPUs as there are groups, and packing per group wastes little (`encode_and_pack`).
Every pass reads the files again rather than holding the corpus in memory between passes:
reading and hashing cost a few percent of tokenizing. The held-out texts come out of the pack
pass rather than a pass of their own, since every pass also costs Ray Data a task per group;
the sample pass runs only when a tokenizer is trained.
"""
from __future__ import annotations

import dataclasses
import json
from functools import lru_cache

import pyarrow as pa
from tokenizers import Tokenizer

from components import storage
from components.config import DataConfig
from components.corpus_files import SourceFile, read_file
from components.documents import SPLITS, Document, ProblemLog, Routing, content_hash
from components.heldout_text import first_heldout
from components.packing import encode_and_pack, write_rows

# A group is about 1/64 of the corpus (so a pass keeps 64 CPUs busy), within 1-64 MB: enough
# text that a task's start-up and its packing tail stay small, and shards that are not tiny.
_GROUPS, _MIN_GROUP_BYTES, _MAX_GROUP_BYTES = 64, 1 << 20, 64 << 20
# The scan's items are this many groups' worth of files: reading and hashing cost about 1/100 of
# tokenizing (the stdlib's 11 MB: 0.02 s against 4 s on one core), so a scan task the size of a
# group would be mostly Ray's cost of a task (~0.03-0.05 s). Its rows do not depend on the items.
_SCAN_ITEM_GROUPS = 8

SCAN_SCHEMA = pa.schema([("doc_id", pa.string()), ("sha", pa.binary()), ("nbytes", pa.int64()),
                         ("problems", pa.string())])
SAMPLE_SCHEMA = pa.schema([("doc_id", pa.string()), ("text", pa.string())])
PACK_SCHEMA = pa.schema([("group", pa.int64()), ("split", pa.string()), ("file", pa.string()),
                         ("documents", pa.int64()), ("bytes", pa.int64()), ("document_tokens", pa.int64()),
                         ("rows", pa.int64()), ("problems", pa.string()),
                         # On the val row only: the group's first validation texts (components/heldout_text.py).
                         ("heldout_ids", pa.list_(pa.string())), ("heldout_texts", pa.list_(pa.string()))])


def group_files(files: list[SourceFile], group_bytes: int | None = None) -> list[dict]:
    """Consecutive files gathered into items of about `group_bytes` (the passes' unit of work).

    The grouping depends only on the listing, never on the cluster, so the same corpus gives
    the same shards on a laptop and on a cluster.
    """
    if group_bytes is None:
        group_bytes = _group_bytes(files)
    items, current, size = [], [], 0
    for f in files:
        current.append(dataclasses.asdict(f))
        size += f.size
        if size >= group_bytes:
            items.append(current)
            current, size = [], 0
    if current:
        items.append(current)
    return [{"group": i, "files": json.dumps(group)} for i, group in enumerate(items)]


def scan_items(files: list[SourceFile]) -> list[dict]:
    """The scan's items: `_SCAN_ITEM_GROUPS` groups' worth of files each."""
    return group_files(files, _SCAN_ITEM_GROUPS * _group_bytes(files))


def _group_bytes(files: list[SourceFile]) -> int:
    return min(_MAX_GROUP_BYTES, max(_MIN_GROUP_BYTES, sum(f.size for f in files) // _GROUPS))


def scan_group(item: dict, data: DataConfig) -> pa.Table:
    """Every document of the group as (doc_id, sha256, UTF-8 bytes), and the problems met reading it."""
    docs, problems = read_group(item, data)
    shas = [content_hash(d.text) for d in docs]
    nbytes = [len(d.text.encode("utf-8")) for d in docs]
    return pa.table({"doc_id": [d.doc_id for d in docs] + [None], "sha": shas + [None], "nbytes": nbytes + [None],
                     "problems": [None] * len(docs) + [problems.to_json()]}, schema=SCAN_SCHEMA)


def sample_group(item: dict, data: DataConfig, routing: Routing) -> pa.Table:
    """The group's training texts that fall in the tokenizer's sample."""
    ids, texts = [], []
    for doc in read_group(item, data)[0]:
        if not routing.in_sample(doc.doc_id):
            continue
        for split, part_id, text in routing.route(doc.doc_id, content_hash(doc.text), doc.text):
            if split == "train":
                ids.append(part_id)
                texts.append(text)
    return pa.table({"doc_id": ids, "text": texts}, schema=SAMPLE_SCHEMA)


def pack_group(item: dict, data: DataConfig, routing: Routing, tokenizer_json: str, dtype: str,
               out: str) -> pa.Table:
    """Tokenize and pack the group's kept documents; write `out/<split>/part-<group>.parquet` per split.

    A split with no complete row in this group writes no file. A shard's name depends only on
    its group, so a retried task overwrites its own shard and never adds a second one.
    """
    docs, problems = read_group(item, data)
    by_split: dict[str, list[str]] = {split: [] for split in SPLITS}
    val_parts = []
    for doc in docs:
        for split, part_id, text in routing.route(doc.doc_id, content_hash(doc.text), doc.text):
            by_split[split].append(text)
            if split == "val":
                val_parts.append((part_id, text))
    tokenizer = _tokenizer(tokenizer_json)
    rows = []
    for split, texts in by_split.items():
        packed, n_tokens = encode_and_pack(texts, tokenizer, data.block_size, dtype)
        name = ""
        if len(packed):
            name = f"{split}/part-{item['group']:05d}.parquet"
            write_rows(storage.join(out, name), packed)
        rows.append({"group": item["group"], "split": split, "file": name, "documents": len(texts),
                     "bytes": sum(len(t.encode("utf-8")) for t in texts), "document_tokens": n_tokens,
                     "rows": len(packed), "problems": None, "heldout_ids": None, "heldout_texts": None})
    rows[-1]["problems"] = problems.to_json()
    val_row = next(r for r in rows if r["split"] == "val")
    val_row["heldout_ids"], val_row["heldout_texts"] = first_heldout(val_parts)
    return pa.Table.from_pylist(rows, schema=PACK_SCHEMA)


def read_group(item: dict, data: DataConfig) -> tuple[list[Document], ProblemLog]:
    """The documents of a group's files, in listing order, and the problems met reading them."""
    problems, docs = ProblemLog(), []
    for entry in json.loads(item["files"]):
        docs.extend(read_file(SourceFile(**entry), data.text_field, data.on_bad_utf8, data.on_bad_json, problems))
    return docs, problems


@lru_cache(maxsize=2)
def _tokenizer(tokenizer_json: str) -> Tokenizer:
    """Parsed once per worker process and tokenizer, not once per group."""
    return Tokenizer.from_str(tokenizer_json)
