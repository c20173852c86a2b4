"""One document at a time: its UTF-8 policy, its content hash, and which split it goes to.

These run inside the data stage's parallel passes (one call per document), so they are pure
and cheap: a document's fate depends only on its own bytes and on the `Routing` the driver
decided from every document's metadata.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field

# Lone surrogates: JSON allows "\ud800", Python decodes it to a str that cannot be encoded as UTF-8.
_SURROGATE = re.compile("[\ud800-\udfff]")
REPLACEMENT = "\ufffd"
SPLITS = ("train", "val")


class DataError(ValueError):
    """A problem with the user's data or data config; the message says where and what to do."""


@dataclass(frozen=True)
class Document:
    """One unit of the corpus.

    Attributes:
        doc_id: stable name: path relative to the source folder (its name for a single file),
            with ":LINE" for a .jsonl line and ":ROW" for a .parquet row.
        text: the document's text.
    """

    doc_id: str
    text: str


@dataclass(frozen=True)
class Problem:
    """Something wrong with the input, at `where` (a file, or file:line / file:row).

    `kind` is what the manifest counts it under. A fatal problem stops the stage; the others
    were handled by the configured policy (a document skipped, or bytes replaced).
    """

    kind: str
    where: str
    message: str
    fatal: bool = False


class ProblemLog:
    """Problems counted by kind, with the first few places of each and every fatal one: bounded
    memory however many rows of a file are skipped."""

    EXAMPLES = 5

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.examples: dict[str, list[str]] = {}
        self.fatal: list[str] = []

    def add(self, problem: Problem) -> None:
        self.counts[problem.kind] = self.counts.get(problem.kind, 0) + 1
        places = self.examples.setdefault(problem.kind, [])
        if len(places) < self.EXAMPLES:
            places.append(problem.message)
        if problem.fatal:
            self.fatal.append(problem.message)

    def merge(self, other: ProblemLog) -> None:
        for kind, n in other.counts.items():
            self.counts[kind] = self.counts.get(kind, 0) + n
            places = self.examples.setdefault(kind, [])
            places.extend(other.examples.get(kind, [])[: self.EXAMPLES - len(places)])
        self.fatal.extend(other.fatal)

    def to_json(self) -> str:
        return json.dumps({"counts": self.counts, "examples": self.examples, "fatal": self.fatal})

    @classmethod
    def from_json(cls, text: str) -> ProblemLog:
        log, data = cls(), json.loads(text)
        log.counts, log.examples, log.fatal = data["counts"], data["examples"], data["fatal"]
        return log


def decode_utf8(data: bytes, where: str, policy: str) -> tuple[str | None, Problem | None]:
    """`data` as text under `data.on_bad_utf8` ("replace" or "skip").

    Returns:
        (text, None) for clean UTF-8; (text with U+FFFD, problem) under "replace";
        (None, problem) under "skip".
    """
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as error:
        detail = f"{where}: bytes that are not UTF-8 (first at byte {error.start})"
        if policy == "skip":
            return None, Problem("skipped_bad_utf8", where, detail + "; document skipped")
        return data.decode("utf-8", errors="replace"), Problem("replaced_bad_utf8", where,
                                                                detail + "; replaced with U+FFFD")


def encodable(text: str, where: str, policy: str) -> tuple[str | None, Problem | None]:
    """`text` made encodable as UTF-8 (lone surrogates, which only JSON can carry), under the same policy."""
    if not _SURROGATE.search(text):
        return text, None
    detail = f"{where}: lone surrogate code points (\\ud800-\\udfff escapes)"
    if policy == "skip":
        return None, Problem("skipped_bad_utf8", where, detail + "; document skipped")
    return _SURROGATE.sub(REPLACEMENT, text), Problem("replaced_bad_utf8", where, detail + "; replaced with U+FFFD")


def content_hash(text: str) -> bytes:
    """sha256 of the document's UTF-8 bytes: equal texts are duplicates, and the split follows it."""
    return hashlib.sha256(text.encode("utf-8")).digest()


def hash_split(sha: bytes, val_fraction: float) -> str:
    """"val" for about `val_fraction` of content hashes, "train" for the rest, stable across runs."""
    # Salted, so the split is unrelated to any other use of the same hash.
    unit = int.from_bytes(hashlib.sha256(b"split:" + sha).digest()[:8], "big") / 2**64
    return "val" if unit < val_fraction else "train"


@dataclass(frozen=True)
class Routing:
    """What the driver decided for every document, small enough to ship to every worker.

    Attributes:
        val_fraction: the hash split's share of val.
        duplicate_keep: content hash -> the one doc_id kept, for hashes seen more than once
            (the smallest doc_id, so the choice does not depend on reading order).
        subset_below: keep only documents whose `subset_key` is at most this (`data.max_bytes`); None: all.
        forced: doc_id -> split, for a tiny corpus whose hash split left a side empty.
        cut_at: doc_id -> character offset: a single-document corpus is cut there, head to
            train and tail to val, on a line boundary.
        sample_below: the tokenizer's sample: training documents whose `sample_key` is at most
            this; None: every training document.
    """

    val_fraction: float
    duplicate_keep: dict[bytes, str] = field(default_factory=dict)
    subset_below: str | None = None
    forced: dict[str, str] = field(default_factory=dict)
    cut_at: dict[str, int] = field(default_factory=dict)
    sample_below: str | None = None

    def kept(self, doc_id: str, sha: bytes) -> bool:
        """Whether the document survives deduplication and the `max_bytes` subset."""
        if self.duplicate_keep.get(sha, doc_id) != doc_id:
            return False
        return self.subset_below is None or subset_key(doc_id) <= self.subset_below

    def route(self, doc_id: str, sha: bytes, text: str) -> list[tuple[str, str, str]]:
        """(split, doc_id, text) for each part of a kept document; empty when it is dropped."""
        if not self.kept(doc_id, sha):
            return []
        if doc_id in self.cut_at:
            cut = self.cut_at[doc_id]
            return [("train", f"{doc_id}#train", text[:cut]), ("val", f"{doc_id}#val", text[cut:])]
        return [(self.forced.get(doc_id) or hash_split(sha, self.val_fraction), doc_id, text)]

    def in_sample(self, doc_id: str) -> bool:
        return self.sample_below is None or sample_key(doc_id) <= self.sample_below


def subset_key(key: str) -> str:
    """The sort key that picks deterministic subsets (of documents, of pairs): sha256 of "subset:" + key."""
    # Salted: ordering by the same hash as the split would fill a small subset with exactly
    # the documents that go to val.
    return hashlib.sha256(b"subset:" + key.encode("utf-8")).hexdigest()


def sample_key(key: str) -> str:
    """The sort key of the tokenizer's sample, salted apart from `subset_key` and the split."""
    return hashlib.sha256(b"tokenizer-sample:" + key.encode("utf-8")).hexdigest()
