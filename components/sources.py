"""Finding a corpus's files (the stdlib, a folder, one file or a glob; local or on storage) and
reading them in a single process: the listing every reader shares, the train/val split of
fine-tuning pairs and the content fingerprint.

The data stage reads the same listing in parallel (`components.data`); `iter_documents` reads
it here, one file after another, for the sources' fingerprint and for small sources.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import sysconfig
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow.fs as pafs

from components import storage
from components.corpus_files import KINDS, SourceFile, iter_jsonl_objects, read_file  # noqa: F401 - re-exported
from components.documents import DataError, Document, ProblemLog, subset_key  # noqa: F401 - re-exported

STDLIB = "stdlib"  # the source name meaning this Python's standard library
_STDLIB_SKIP_DIRS = frozenset({"test", "tests", "site-packages", "__pycache__", "idlelib", "lib2to3"})
_GLOB_CHARS = "*?["


def list_source(source: str, key: str = "data.source", suffixes: tuple[str, ...] = tuple(KINDS),
                allow_empty: bool = False) -> list[SourceFile]:
    """The files of a source, sorted by doc_id.

    Args:
        source: "stdlib" (its .py files, tests excluded), a folder (read recursively; names
            starting with "." or "_" are skipped, as Ray and pyarrow skip them), one file, or a
            glob whose last parts hold the wildcards (`corpus/**/*.jsonl`, `s3://b/c/*.parquet`).
        key: the config key named in errors.
        suffixes: the file types to take (.txt/.md/.py are text, .jsonl, .parquet).
        allow_empty: return an empty list rather than fail when no file matches.

    Raises:
        DataError: the path does not exist, cannot be opened, is of an unsupported type, or
            holds no file of these types.
    """
    if source == STDLIB:
        return _list_stdlib(suffixes)
    base, pattern = _split_glob(source)
    try:
        fs, path = storage.resolve(base)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise DataError(f"{key}={source!r} does not exist; give a folder, a .txt/.md/.py/.jsonl/.parquet file, "
                            "a glob, or 'stdlib'")
        if info.type == pafs.FileType.File and pattern is None:
            kind = KINDS.get(_suffix(path)) if _suffix(path) in suffixes else None
            if kind is None:
                raise DataError(f"{key}={source!r}: unsupported file type {_suffix(path)!r}; give a folder, a "
                                f"{'/'.join(suffixes)} file, a glob, or 'stdlib'")
            return [SourceFile(storage.normalize(base), "", info.base_name, info.size, kind)]
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except OSError as error:  # a StorageError, or a listing refused by the filesystem
        raise DataError(f"{key}={source!r}: cannot be read ({error})") from None
    root = storage.normalize(base)
    found = []
    for entry in infos:
        rel = entry.path[len(path):].lstrip("/")
        if entry.type != pafs.FileType.File or any(part[:1] in "._" for part in rel.split("/")):
            continue
        if _suffix(rel) in suffixes and (pattern is None or _matches(rel, pattern)):
            found.append(SourceFile(root, rel, rel, entry.size, KINDS[_suffix(rel)]))
    if not found and not allow_empty:
        raise DataError(f"{key}={source!r}: no {'/'.join(suffixes)} files found"
                        + (f" matching {pattern!r}" if pattern else "") + "; point it at the corpus")
    return sorted(found, key=lambda f: f.doc_id)


def iter_documents(source: str, *, text_field: str = "text", max_bytes: int = 0, on_bad_utf8: str = "replace",
                   on_bad_json: str = "fail", key: str = "data.source") -> Iterator[Document]:
    """Yield the documents of a corpus in a deterministic order, in this process.

    Args:
        source: as `list_source` says.
        text_field: key (jsonl) or column (parquet) holding the text.
        max_bytes: if > 0, keep a deterministic subset spread over the corpus:
            documents ordered by sha256("subset:" + doc_id), taken until their
            UTF-8 size reaches `max_bytes`. The subset is yielded in corpus order.
        on_bad_utf8 / on_bad_json: as `data.on_bad_utf8` / `data.on_bad_json`.

    Raises:
        DataError: as `list_source` says, or the first fatal problem of a file (a jsonl line
            that is not an object with a string `text_field`, a parquet file without that
            column, an unreadable or corrupt file).
    """
    docs = _read_all(list_source(source, key), text_field, on_bad_utf8, on_bad_json)
    yield from _subset(docs, max_bytes) if max_bytes > 0 else docs


def iter_sft_documents(source: str, max_bytes: int) -> Iterator[Document]:
    """The raw files of a fine-tuning source (`finetune.source`), as documents.

    Args:
        source: "stdlib" or a folder (their .py files, as `iter_documents` reads
            them), or one file, yielded whole as a single document.
        max_bytes: as in `iter_documents`, applied to the .py files.

    Raises:
        DataError: the path does not exist.
    """
    if source != STDLIB and _is_file(source):
        yield from _read_all([SourceFile(storage.normalize(source), "", Path(source).name, 0, "text")], "text",
                             "replace", "fail")
        return
    # No .py files is not an error here: the data stage reports the pairs it found, none.
    files = list_source(source, "finetune.source", (".py",), allow_empty=True)
    docs = _read_all(files, "text", "replace", "fail")
    yield from _subset(docs, max_bytes) if max_bytes > 0 else docs


def document_split(doc_id: str, val_fraction: float) -> str:
    """Assign an item to "train" or "val" from a hash of its id (fine-tuning pairs are split so).

    Returns:
        "val" for about `val_fraction` of ids, "train" for the rest.
    """
    digest = hashlib.sha256(doc_id.encode("utf-8")).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"


def fingerprint(docs: Iterable[Document], **config) -> str:
    """sha256 hex over document ids and texts and the sorted config items.

    Equal fingerprints mean equal inputs, so a cached output can be reused.
    """
    h = hashlib.sha256()

    def feed(s: str) -> None:
        b = s.encode("utf-8", errors="surrogatepass")
        h.update(len(b).to_bytes(8, "big"))  # length prefix: ("ab","c") != ("a","bc")
        h.update(b)

    for doc in docs:
        feed(doc.doc_id)
        feed(doc.text)
    feed(json.dumps(sorted(config.items()), default=str))
    return h.hexdigest()


def _read_all(files: list[SourceFile], text_field: str, on_bad_utf8: str, on_bad_json: str) -> Iterator[Document]:
    for f in files:
        problems = ProblemLog()
        docs = read_file(f, text_field, on_bad_utf8, on_bad_json, problems)
        if problems.fatal:
            raise DataError(problems.fatal[0])
        yield from docs


def _subset(docs: Iterable[Document], max_bytes: int) -> Iterator[Document]:
    """Apply the `max_bytes` selection to an in-order document stream."""
    docs = list(docs)
    chosen: set[int] = set()
    total = 0
    for i in sorted(range(len(docs)), key=lambda i: subset_key(docs[i].doc_id)):
        if total >= max_bytes:
            break
        chosen.add(i)
        total += len(docs[i].text.encode("utf-8"))
    yield from (d for i, d in enumerate(docs) if i in chosen)


def _list_stdlib(suffixes: tuple[str, ...]) -> list[SourceFile]:
    """The stdlib's .py files, walked with its test and vendored folders pruned (not listed, then dropped)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS]
        for name in filenames:
            if name.endswith(".py") and ".py" in suffixes:
                path = Path(dirpath) / name
                found.append(SourceFile(str(root), path.relative_to(root).as_posix(), path.relative_to(root).as_posix(),
                                        path.stat().st_size, "text"))
    return sorted(found, key=lambda f: f.doc_id)


def _split_glob(source: str) -> tuple[str, str | None]:
    """("corpus", "**/*.jsonl") for "corpus/**/*.jsonl"; (source, None) without wildcards."""
    parts = source.split("/")
    first = next((i for i, part in enumerate(parts) if any(c in part for c in _GLOB_CHARS)), None)
    if first is None:
        return source, None
    return "/".join(parts[:first]) or ".", "/".join(parts[first:])


def _matches(rel: str, pattern: str) -> bool:
    """fnmatch, where a leading `**/` also matches no folder at all (`**/*.txt` matches `a.txt`)."""
    return fnmatch.fnmatchcase(rel, pattern) or (pattern.startswith("**/") and fnmatch.fnmatchcase(rel, pattern[3:]))


def _suffix(name: str) -> str:
    return os.path.splitext(name)[1].lower()


def _is_file(source: str) -> bool:
    try:
        return storage.is_file(source)
    except OSError:  # an unreachable location: list_source names it
        return False
