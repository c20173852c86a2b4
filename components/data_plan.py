"""The driver's decisions between the scan and the packing: which documents are kept, which
split each goes to, and which ones the tokenizer learns from, all from one small row of
metadata per document (doc_id, content hash, size).

The driver holds that metadata, about 100 bytes a document (10M documents: ~1 GB), never
the texts; what it ships to the workers (`Routing`) grows only with the duplicates.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from components.config import DataConfig, TokenizerConfig
from components.documents import Routing, hash_split, sample_key, subset_key


@dataclass(frozen=True)
class Plan:
    """The routing and what it implies: the counts the manifest reports and the packing must match."""

    routing: Routing
    documents_read: int
    duplicates: int
    outside_subset: int
    split_documents: dict[str, int]
    split_bytes: dict[str, int]
    sample_documents: int
    suite_documents: int = 0  # kept documents of the evaluation suite, sent to val whatever their hash says


def plan_routing(meta: pa.Table, data: DataConfig, tokenizer: TokenizerConfig,
                 text_of: Callable[[str], str], held_out: frozenset = frozenset()) -> Plan:
    """Decide deduplication, the `max_bytes` subset, the split and the tokenizer's sample.

    Args:
        meta: one row per document read: doc_id (string), sha (binary), nbytes (int64).
        text_of: reads one document's text by doc_id (only for a single-document corpus,
            which is cut in two on a line boundary).
        held_out: content hashes that must never be trained on (the evaluation suite's
            documents): they go to val.
    """
    # Exact duplicates: per content hash, keep the smallest doc_id (independent of reading order).
    groups = meta.group_by("sha").aggregate([("doc_id", "min"), ("doc_id", "count")])
    repeated = groups.filter(pc.greater(groups["doc_id_count"], 1))
    duplicate_keep = dict(zip(repeated["sha"].to_pylist(), repeated["doc_id_min"].to_pylist()))
    unique = groups.join(meta, keys=["sha", "doc_id_min"], right_keys=["sha", "doc_id"], join_type="inner")
    ids = unique["doc_id_min"].to_pylist()
    shas = unique["sha"].to_pylist()
    sizes = unique["nbytes"].to_numpy()
    order = sorted(range(len(ids)), key=ids.__getitem__)  # corpus order: every later choice is deterministic
    ids, shas, sizes = [ids[i] for i in order], [shas[i] for i in order], sizes[order]

    subset_below, keep = None, np.ones(len(ids), dtype=bool)
    if data.max_bytes > 0:
        subset_below, keep = _below(ids, sizes, data.max_bytes, subset_key)
    kept_ids = [d for d, k in zip(ids, keep) if k]
    kept_shas = [s for s, k in zip(shas, keep) if k]
    kept_sizes = sizes[keep]

    splits = ["val" if sha in held_out else hash_split(sha, data.val_fraction) for sha in kept_shas]
    forced = {d: "val" for d, sha in zip(kept_ids, kept_shas) if sha in held_out}
    cut_at = {}
    if len(set(splits)) < 2 and len(kept_ids) >= 2 and not forced:
        # A tiny corpus whose hash split left a side empty: the last documents go to val.
        n_val = min(len(kept_ids) - 1, max(1, round(len(kept_ids) * data.val_fraction)))
        splits = ["train"] * (len(kept_ids) - n_val) + ["val"] * n_val
        forced = dict(zip(kept_ids, splits))
    split_documents = {s: splits.count(s) for s in ("train", "val")}
    split_bytes = {s: int(sum(n for n, x in zip(kept_sizes, splits) if x == s)) for s in ("train", "val")}
    if len(kept_ids) == 1:
        # One document (say, a single big .txt): its text is cut on a line boundary.
        text = text_of(kept_ids[0])
        cut = int(len(text) * (1 - data.val_fraction))
        line_start = text.rfind("\n", 0, cut) + 1
        cut = line_start if line_start > 0 else cut
        cut_at = {kept_ids[0]: cut}
        split_documents = {"train": 1, "val": 1}
        split_bytes = {"train": len(text[:cut].encode("utf-8")), "val": len(text[cut:].encode("utf-8"))}

    sample_below, sample_documents = None, split_documents["train"]
    train_ids = [d for d, x in zip(kept_ids, splits) if x == "train" and not cut_at]
    train_sizes = np.array([n for n, x in zip(kept_sizes, splits) if x == "train" and not cut_at], dtype=np.int64)
    if tokenizer.file is None and 0 < tokenizer.sample_bytes < split_bytes["train"] and train_ids:
        sample_below, chosen = _below(train_ids, train_sizes, tokenizer.sample_bytes, sample_key)
        sample_documents = int(chosen.sum())
    routing = Routing(data.val_fraction, duplicate_keep, subset_below, forced, cut_at, sample_below)
    return Plan(routing, meta.num_rows, meta.num_rows - len(ids), len(ids) - len(kept_ids), split_documents,
                split_bytes, sample_documents, len(forced) if not cut_at else 0)


def _below(ids: list[str], sizes: np.ndarray, budget: int, key: Callable[[str], str]) -> tuple[str, np.ndarray]:
    """The documents taken in `key` order until their bytes reach `budget`: (the last key taken, which ones)."""
    keys = [key(d) for d in ids]
    order = sorted(range(len(ids)), key=keys.__getitem__)
    total, taken = 0, np.zeros(len(ids), dtype=bool)
    for i in order:
        if total >= budget:
            break
        taken[i] = True
        total += int(sizes[i])
    return max(k for k, t in zip(keys, taken) if t), taken
