"""The validation documents as raw text (`heldout_text.jsonl`), for bits per byte.

Token rows are tied to the tokenizer that made them; a model with another tokenizer
needs the text itself. The data stage writes the first `HELDOUT_TEXT_MAX_BYTES` of the
validation documents, in doc_id order (so the same corpus gives the same file however
the passes ran), one JSON object a line: {"doc_id": ..., "text": ...}.
"""
from __future__ import annotations

import json

import pyarrow as pa

from components import storage
from components.config import DataConfig
from components.data_passes import read_group
from components.documents import Routing, content_hash

HELDOUT_TEXT_FILE = "heldout_text.jsonl"
HELDOUT_TEXT_MAX_BYTES = 1 << 20  # a bounded sample: enough for a stable bits per byte, small to read
HELDOUT_SCHEMA = pa.schema([("doc_id", pa.string()), ("text", pa.string())])


def heldout_group(item: dict, data: DataConfig, routing: Routing) -> pa.Table:
    """The group's validation texts, in doc_id order, at most HELDOUT_TEXT_MAX_BYTES of them (a pass
    over one group of files, like those of `components.data_passes`)."""
    parts = []
    for doc in read_group(item, data)[0]:
        for split, part_id, text in routing.route(doc.doc_id, content_hash(doc.text), doc.text):
            if split == "val":
                parts.append((part_id, text))
    parts.sort()
    ids, texts, total = [], [], 0
    for part_id, text in parts:
        if total >= HELDOUT_TEXT_MAX_BYTES:
            break
        ids.append(part_id)
        texts.append(text)
        total += len(text.encode("utf-8"))
    return pa.table({"doc_id": ids, "text": texts}, schema=HELDOUT_SCHEMA)


def write_heldout_text(location: str, table: pa.Table) -> dict:
    """Write the first HELDOUT_TEXT_MAX_BYTES of the texts (doc_id order; the last one cut on a character
    boundary) as `location/heldout_text.jsonl`. Returns what the manifest records: documents and bytes."""
    table = table.sort_by("doc_id")
    lines, total = [], 0
    for doc_id, text in zip(table["doc_id"].to_pylist(), table["text"].to_pylist()):
        left = HELDOUT_TEXT_MAX_BYTES - total
        if left <= 0:
            break
        raw = text.encode("utf-8")
        if len(raw) > left:
            text = raw[:left].decode("utf-8", errors="ignore")
        total += len(text.encode("utf-8"))
        lines.append(json.dumps({"doc_id": doc_id, "text": text}, ensure_ascii=False))
    storage.write_bytes(storage.join(location, HELDOUT_TEXT_FILE), "".join(f"{line}\n" for line in lines).encode())
    return {"file": HELDOUT_TEXT_FILE, "documents": len(lines), "bytes": total}
