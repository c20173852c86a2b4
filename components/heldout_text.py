"""The validation documents as raw text (`heldout_text.jsonl`), for bits per byte.

Token rows are tied to the tokenizer that made them; a model with another tokenizer
needs the text itself. The data stage writes the first `HELDOUT_TEXT_MAX_BYTES` of the
validation documents, in doc_id order (so the same corpus gives the same file however
the passes ran), one JSON object a line: {"doc_id": ..., "text": ..., "sha": ...} (sha: the
whole document's content hash, hex, which an evaluation suite pinned from the file keeps
out of later runs' training data).
"""
from __future__ import annotations

import json

import pyarrow as pa

from components import storage
from components.documents import content_hash

HELDOUT_TEXT_FILE = "heldout_text.jsonl"
HELDOUT_TEXT_MAX_BYTES = 1 << 20  # a bounded sample: enough for a stable bits per byte, small to read
HELDOUT_SCHEMA = pa.schema([("doc_id", pa.string()), ("text", pa.string())])


def first_heldout(parts: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """The (doc_id, text) parts of one group's validation documents cut to the first
    HELDOUT_TEXT_MAX_BYTES in doc_id order, as two lists: what the pack pass returns for the file.

    Every group keeps its own first MiB, so the merged, re-sorted lists always hold the corpus's
    first MiB whichever groups it comes from (`write_heldout_text` trims the rest)."""
    ids, texts, total = [], [], 0
    for part_id, text in sorted(parts):
        if total >= HELDOUT_TEXT_MAX_BYTES:
            break
        ids.append(part_id)
        texts.append(text)
        total += len(text.encode("utf-8"))
    return ids, texts


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
        sha = content_hash(text).hex()  # of the whole document, cut or not: what the data stage routes by
        if len(raw) > left:
            text = raw[:left].decode("utf-8", errors="ignore")
        total += len(text.encode("utf-8"))
        lines.append(json.dumps({"doc_id": doc_id, "text": text, "sha": sha}, ensure_ascii=False))
    storage.write_bytes(storage.join(location, HELDOUT_TEXT_FILE), "".join(f"{line}\n" for line in lines).encode())
    return {"file": HELDOUT_TEXT_FILE, "documents": len(lines), "bytes": total}
