"""Reading a corpus: documents from the stdlib, a folder, a .jsonl or a .parquet file, with
deterministic subsets, the train/val split by document id, and a content fingerprint."""
from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow.parquet as pq

STDLIB = "stdlib"  # the source name meaning this Python's standard library
_STDLIB_SKIP_DIRS = frozenset({"test", "tests", "site-packages", "__pycache__", "idlelib", "lib2to3"})
_FOLDER_SUFFIXES = (".txt", ".md", ".py")


class DataError(ValueError):
    """A problem with the user's data or data config; the message says where and what to do."""


@dataclass(frozen=True)
class Document:
    """One unit of the corpus.

    Attributes:
        doc_id: stable name: path relative to the source folder, or
            "file.jsonl:LINE" / "file.parquet:ROW".
        text: the document's text.
    """

    doc_id: str
    text: str


def iter_documents(source: str, *, text_field: str = "text", max_bytes: int = 0) -> Iterator[Document]:
    """Yield the documents of a corpus in a deterministic order.

    Args:
        source: "stdlib" (the .py files of this Python's standard library, tests
            excluded), a folder (its .txt/.md/.py files, recursively), a
            `.jsonl` file (one JSON object per line) or a `.parquet` file.
        text_field: key (jsonl) or column (parquet) holding the text.
        max_bytes: if > 0, keep a deterministic subset spread over the corpus:
            documents ordered by sha256("subset:" + doc_id), taken until their
            UTF-8 size reaches `max_bytes`. The subset is yielded in corpus order.

    Raises:
        DataError: missing path, unsupported file type, a jsonl line that is
            not an object with a string `text_field`, a parquet file without
            that column.
    """
    if source == STDLIB:
        yield from _iter_tree(_stdlib_root(), (".py",), _STDLIB_SKIP_DIRS, max_bytes)
        return
    path = Path(source)
    if not path.exists():
        raise DataError(f"data.source={source!r} does not exist; give a folder, a .jsonl or .parquet file, or 'stdlib'")
    if path.is_dir():
        yield from _iter_tree(path, _FOLDER_SUFFIXES, frozenset(), max_bytes)
    elif path.suffix == ".jsonl":
        yield from _subset(_iter_jsonl_texts(path, text_field), max_bytes)
    elif path.suffix == ".parquet":
        yield from _subset(_iter_parquet_texts(path, text_field), max_bytes)
    else:
        raise DataError(
            f"data.source={source!r}: unsupported file type {path.suffix!r}; "
            "give a folder of .txt/.md/.py files, a .jsonl or .parquet file, or 'stdlib'"
        )


def iter_sft_documents(source: str, max_bytes: int) -> Iterator[Document]:
    """The raw files of a fine-tuning source (`finetune.source`), as documents.

    Args:
        source: "stdlib" or a folder (their .py files, as `iter_documents` reads
            them), or one file, yielded whole as a single document.
        max_bytes: as in `iter_documents`, applied to the .py files.

    Raises:
        DataError: the path does not exist.
    """
    if source == STDLIB:
        yield from _iter_tree(_stdlib_root(), (".py",), _STDLIB_SKIP_DIRS, max_bytes)
        return
    path = Path(source)
    if not path.exists():
        raise DataError(f"finetune.source={source!r} does not exist; give a folder of .py files, a .jsonl file, "
                        f"or 'stdlib'")
    if path.is_dir():
        yield from _iter_tree(path, (".py",), frozenset(), max_bytes)
    else:
        yield Document(path.name, _read_text(path))


def iter_jsonl_objects(path: Path) -> Iterator[tuple[int, dict]]:
    """(1-based line number, object) for each non-blank line of a jsonl file.

    Raises:
        DataError: a line that is not valid JSON or not an object, naming the line.
    """
    with path.open(encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be one JSON object") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def document_split(doc_id: str, val_fraction: float) -> str:
    """Assign a document to "train" or "val" from a hash of its id.

    The split of a document never changes when other documents are added or
    removed, so validation stays comparable across corpus versions.

    Returns:
        "val" for about `val_fraction` of ids, "train" for the rest.
    """
    return "val" if _unit_hash(doc_id) < val_fraction else "train"


def subset_key(key: str) -> str:
    """The sort key that picks deterministic subsets (of documents, of pairs): sha256 of "subset:" + key."""
    # Salted: ordering by the same hash as document_split would fill a small
    # subset with exactly the documents that go to val.
    return hashlib.sha256(b"subset:" + key.encode("utf-8")).hexdigest()


def fingerprint(docs: Iterable[Document], **config) -> str:
    """sha256 hex over document ids and texts and the sorted config items.

    Equal fingerprints mean equal inputs, so a cached output can be reused.
    """
    h = hashlib.sha256()

    def feed(s: str) -> None:
        b = s.encode("utf-8")
        h.update(len(b).to_bytes(8, "big"))  # length prefix: ("ab","c") != ("a","bc")
        h.update(b)

    for doc in docs:
        feed(doc.doc_id)
        feed(doc.text)
    feed(json.dumps(sorted(config.items()), default=str))
    return h.hexdigest()


def _unit_hash(key: str) -> float:
    """Map a string to [0, 1) via sha256: stable across runs and machines (unlike hash())."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _list_tree(root: Path, suffixes: tuple[str, ...], skip_dirs: frozenset[str]) -> list[tuple[str, Path]]:
    """(doc_id, path) of matching files under root, sorted by doc_id (POSIX relative path)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip_dirs]
        for name in filenames:
            if name.endswith(suffixes):
                path = Path(dirpath) / name
                found.append((path.relative_to(root).as_posix(), path))
    return sorted(found)


def _read_text(path: Path) -> str:
    # Corpora collect stray bytes; a replaced character is better than losing the file.
    return path.read_text(encoding="utf-8", errors="replace")


def _iter_tree(root: Path, suffixes: tuple[str, ...], skip_dirs: frozenset[str], max_bytes: int) -> Iterator[Document]:
    listing = _list_tree(root, suffixes, skip_dirs)
    if max_bytes <= 0:
        for doc_id, path in listing:
            text = _read_text(path)
            if text:  # an empty file would only add a lone EOT
                yield Document(doc_id, text)
        return
    # Read in hash order so only the chosen files are read, then restore corpus order.
    chosen: list[Document] = []
    total = 0
    for doc_id, path in sorted(listing, key=lambda item: subset_key(item[0])):
        if total >= max_bytes:
            break
        text = _read_text(path)
        if text:
            chosen.append(Document(doc_id, text))
            total += len(text.encode("utf-8"))
    order = {doc_id: i for i, (doc_id, _) in enumerate(listing)}
    yield from sorted(chosen, key=lambda d: order[d.doc_id])


def _subset(docs: Iterable[Document], max_bytes: int) -> Iterator[Document]:
    """Apply the `max_bytes` selection to an in-order document stream."""
    if max_bytes <= 0:
        yield from docs
        return
    docs = list(docs)
    chosen: set[int] = set()
    total = 0
    for i in sorted(range(len(docs)), key=lambda i: subset_key(docs[i].doc_id)):
        if total >= max_bytes:
            break
        chosen.add(i)
        total += len(docs[i].text.encode("utf-8"))
    yield from (d for i, d in enumerate(docs) if i in chosen)


def _iter_jsonl_texts(path: Path, text_field: str) -> Iterator[Document]:
    for lineno, obj in iter_jsonl_objects(path):
        text = obj.get(text_field)
        if not isinstance(text, str):
            problem = "has no" if text_field not in obj else "has a non-string"
            raise DataError(
                f"{path}:{lineno}: object {problem} field {text_field!r} (keys: {sorted(obj)}); "
                "fix the line or set data.text_field to the key that holds the text"
            )
        if text:
            yield Document(f"{path.name}:{lineno}", text)


def _iter_parquet_texts(path: Path, text_field: str) -> Iterator[Document]:
    names = pq.read_schema(path).names
    if text_field not in names:
        raise DataError(f"{path}: no column {text_field!r} (columns: {names}); set data.text_field to the text column")
    column = pq.read_table(path, columns=[text_field]).column(text_field)
    for row, text in enumerate(column.to_pylist(), start=1):
        if text is None or text == "":  # null rows are common in exported datasets
            continue
        if not isinstance(text, str):
            raise DataError(f"{path}: row {row} of column {text_field!r} is {type(text).__name__}, expected a string")
        yield Document(f"{path.name}:{row}", text)
