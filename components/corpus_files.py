"""Reading one corpus file (text, .jsonl or .parquet, local or on storage) into documents.

Bad input never escapes as a traceback: each reader returns the documents it could read and
the `Problem`s it met, each naming the file (and line or row). Whether a problem stops the
stage (`fatal`) or is a counted skip follows the data settings (`on_bad_utf8`, `on_bad_json`);
a missing field or column, an unreadable file and a corrupt parquet file are always fatal.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from components import storage
from components.documents import DataError, Document, Problem, ProblemLog, decode_utf8, encodable

TEXT_SUFFIXES = (".txt", ".md", ".py")
KINDS = {**dict.fromkeys(TEXT_SUFFIXES, "text"), ".jsonl": "jsonl", ".parquet": "parquet"}
_CHUNK = 8 << 20
_LOCAL = pafs.LocalFileSystem()


@dataclass(frozen=True)
class SourceFile:
    """One file of a source: `root` (a folder, or the file itself) and its path below it.

    Attributes:
        root: the source's location, normalized (`storage.normalize`): a local path or a URI.
        rel: the path below `root` ("" when the source is this one file).
        doc_id: the file's name in document ids: `rel`, or the file's name for a single file.
        size: bytes on storage.
        kind: "text", "jsonl" or "parquet".
    """

    root: str
    rel: str
    doc_id: str
    size: int
    kind: str

    @property
    def location(self) -> str:
        return f"{self.root.rstrip('/')}/{self.rel}" if self.rel else self.root  # root is normalized already


def read_file(f: SourceFile, text_field: str, on_bad_utf8: str, on_bad_json: str, problems: ProblemLog
              ) -> list[Document]:
    """The documents of one file; every problem met reading it goes to `problems`.

    Args:
        text_field: the .jsonl field or .parquet column holding the text.
        on_bad_utf8 / on_bad_json: the policies of `data.on_bad_utf8` / `data.on_bad_json`.
    """
    docs: list[Document] = []
    try:
        if f.kind == "text":
            _read_text(f, on_bad_utf8, docs, problems)
        elif f.kind == "jsonl":
            _read_jsonl(f, text_field, on_bad_utf8, on_bad_json, docs, problems)
        else:
            _read_parquet(f, text_field, docs, problems)
    except _Fatal as fatal:
        problems.add(fatal.problem)
    except OSError as error:  # permissions, a vanished file, a network error (StorageError is one too)
        problems.add(Problem("unreadable", f.location, f"{f.location}: cannot read ({_first_line(error)})",
                             fatal=True))
    return docs


def iter_jsonl_objects(location: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """(1-based line number, object) for each non-blank line of a .jsonl file (path or URI).

    Raises:
        DataError: a line that is not valid JSON or not an object, naming the line.
    """
    location = os.fspath(location)
    fs, path = _filesystem(location)
    with fs.open_input_stream(path) as stream:
        for lineno, line in enumerate(_lines(stream), start=1):
            if not line.strip():
                continue
            obj, problem = _json_object(line.decode("utf-8", errors="replace"), f"{location}:{lineno}", "fail")
            if problem is not None:
                raise DataError(problem.message)
            yield lineno, obj


class _Fatal(Exception):
    def __init__(self, problem: Problem):
        super().__init__(problem.message)
        self.problem = problem


def _read_text(f: SourceFile, on_bad_utf8: str, docs: list, problems: ProblemLog) -> None:
    fs, path = _filesystem(f.location)
    with fs.open_input_stream(path) as stream:
        data = stream.read()
    text, problem = decode_utf8(data, f.location, on_bad_utf8)
    _keep(Document(f.doc_id, text) if text is not None else None, problem, f.location, docs, problems)


def _read_jsonl(f: SourceFile, text_field: str, on_bad_utf8: str, on_bad_json: str, docs: list,
                problems: ProblemLog) -> None:
    fs, path = _filesystem(f.location)
    with fs.open_input_stream(path) as stream:
        for lineno, raw in enumerate(_lines(stream), start=1):
            if not raw.strip():
                continue
            where = f"{f.location}:{lineno}"
            line, problem = decode_utf8(raw, where, on_bad_utf8)
            if line is None:
                problems.add(problem)
                continue
            if problem is not None:
                problems.add(problem)
            obj, problem = _json_object(line, where, on_bad_json)
            if obj is None:
                if problem.fatal:
                    raise _Fatal(problem)
                problems.add(problem)
                continue
            text = obj.get(text_field)
            if not isinstance(text, str):
                state = "has no" if text_field not in obj else f"has a {type(text).__name__}, not a string, in"
                raise _Fatal(Problem("missing_field", where, f"{where}: object {state} field {text_field!r} "
                                     f"(keys: {sorted(obj)}); fix the line or set data.text_field to the key "
                                     "that holds the text", fatal=True))
            text, problem = encodable(text, where, on_bad_utf8)
            _keep(Document(f"{f.doc_id}:{lineno}", text) if text is not None else None, problem, where, docs,
                  problems)


def _json_object(line: str, where: str, on_bad_json: str) -> tuple[dict | None, Problem | None]:
    try:
        obj = json.loads(line)
        detail = None if isinstance(obj, dict) else f"expected a JSON object, got {type(obj).__name__}"
    except json.JSONDecodeError as error:
        obj, detail = None, f"not valid JSON ({error.msg})"
    if detail is None:
        return obj, None
    if on_bad_json == "skip":
        return None, Problem("skipped_bad_json", where, f"{where}: {detail}; line skipped")
    return None, Problem("bad_json", where, f"{where}: {detail}; each line must be one JSON object "
                         "(or set data.on_bad_json=skip)", fatal=True)


def _read_parquet(f: SourceFile, text_field: str, docs: list, problems: ProblemLog) -> None:
    fs, path = _filesystem(f.location)
    try:
        parquet = pq.ParquetFile(fs.open_input_file(path))
        names = parquet.schema_arrow.names
        if text_field not in names:
            raise _Fatal(Problem("missing_field", f.location, f"{f.location}: no column {text_field!r} (columns: "
                                 f"{names}); set data.text_field to the text column", fatal=True))
        column_type = parquet.schema_arrow.field(text_field).type
        if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
            raise _Fatal(Problem("missing_field", f.location, f"{f.location}: column {text_field!r} is "
                                 f"{column_type}, expected strings; set data.text_field to the text column",
                                 fatal=True))
        row = 0
        for batch in parquet.iter_batches(columns=[text_field]):
            for text in batch.column(0).to_pylist():
                row += 1
                where = f"{f.location}:{row}"
                _keep(Document(f"{f.doc_id}:{row}", text) if text is not None else None, None, where, docs,
                      problems, null_ok=True)
    except pa.ArrowException as error:  # not a parquet file, a cut-short file, a bad page
        raise _Fatal(Problem("corrupt_parquet", f.location, f"{f.location}: not a readable parquet file "
                             f"({_first_line(error)}); replace or remove it", fatal=True)) from None


def _keep(doc: Document | None, problem: Problem | None, where: str, docs: list, problems: ProblemLog,
          null_ok: bool = False) -> None:
    """Record a document (an empty one is a counted skip: it would only add a lone EOT) and its problem."""
    if problem is not None:
        problems.add(problem)
    if doc is None:
        if null_ok:  # a null row: common in exported datasets, counted like an empty one
            problems.add(Problem("skipped_empty", where, f"{where}: empty document skipped"))
        return
    if doc.text:
        docs.append(doc)
    else:
        problems.add(Problem("skipped_empty", where, f"{where}: empty document skipped"))


def _lines(stream) -> Iterator[bytes]:
    """The lines of a pyarrow input stream (which has no readline), without their newline."""
    tail = b""
    while chunk := stream.read(_CHUNK):
        lines = (tail + chunk).split(b"\n")
        tail = lines.pop()
        yield from lines
    if tail:
        yield tail


@lru_cache(maxsize=64)
def _filesystem_of(root: str) -> tuple[pafs.FileSystem, str]:
    return storage.resolve(root)


def _filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem of `location`, opened once per bucket (an S3 filesystem looks up its region)."""
    if not storage.is_remote(location):
        return _LOCAL, location if location.startswith("/") else storage.normalize(location)
    scheme, _, rest = storage.normalize(location).partition("://")
    bucket, _, key = rest.partition("/")
    fs, base = _filesystem_of(f"{scheme}://{bucket}")
    return fs, f"{base.rstrip('/')}/{key}" if key else base


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
