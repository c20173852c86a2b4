"""Tests for components/sources.py: reading corpora from real files, subsets, the split, the fingerprint."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from components.corpus_files import read_file
from components.documents import ProblemLog
from components.sources import (DataError, Document, document_split, fingerprint, iter_documents, iter_sft_documents,
                                list_source)
from tests.corpora import write_text_corpus


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return write_text_corpus(tmp_path / "corpus")


def test_missing_path_and_unsupported_type(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        list(iter_documents(str(tmp_path / "nope")))
    (tmp_path / "data.csv").write_text("text\nhi\n")
    with pytest.raises(DataError, match="unsupported"):
        list(iter_documents(str(tmp_path / "data.csv")))
    with pytest.raises(DataError, match="finetune.source.*does not exist"):
        list(iter_sft_documents(str(tmp_path / "nope"), 0))


def test_folder_documents_sorted_with_relative_ids(corpus):
    ids = [d.doc_id for d in iter_documents(str(corpus))]
    assert ids == sorted(ids)
    assert "sub/deep.txt" in ids and "notes.md" in ids and "ignored.csv" not in ids


def test_sft_documents_are_the_py_files_or_the_one_file(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "b.txt").write_text("not python\n")
    assert list(iter_sft_documents(str(tmp_path), 0)) == [Document("a.py", "x = 1\n")]
    assert list(iter_sft_documents(str(tmp_path / "b.txt"), 0)) == [Document("b.txt", "not python\n")]


def test_jsonl_source(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "hello"}\n\n{"body": "x", "text": "world"}\n')
    docs = list(iter_documents(str(path)))
    assert docs == [Document("c.jsonl:1", "hello"), Document("c.jsonl:3", "world")]


def test_jsonl_custom_field_and_missing_field(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"body": "hello"}\n{"body": "a"}\n{"text": "no body here"}\n')
    with pytest.raises(DataError, match=r"c\.jsonl:3") as err:
        list(iter_documents(str(path), text_field="body"))
    assert "'body'" in str(err.value)


def test_jsonl_bad_json_names_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"c\.jsonl:2.*JSON"):
        list(iter_documents(str(path)))


def test_parquet_source(tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"content": ["one", None, "three"]}), path)
    assert [d.text for d in iter_documents(str(path), text_field="content")] == ["one", "three"]
    with pytest.raises(DataError, match="'text'"):
        list(iter_documents(str(path)))


def test_max_bytes_subset_is_deterministic(corpus):
    full = list(iter_documents(str(corpus)))
    first = list(iter_documents(str(corpus), max_bytes=2000))
    second = list(iter_documents(str(corpus), max_bytes=2000))
    assert first == second
    assert 0 < len(first) < len(full)
    assert sum(len(d.text.encode()) for d in first) >= 2000
    assert [d.doc_id for d in first] == sorted(d.doc_id for d in first)  # corpus order kept


def test_max_bytes_subset_does_not_favour_val(tmp_path):
    # The subset order and the train/val split must use unrelated hashes, or a
    # small subset would be mostly val documents.
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": f"doc {i:05d}"}) + "\n" for i in range(1000)))
    chosen = list(iter_documents(str(path), max_bytes=2000))  # 9 bytes each -> ~223 docs
    val_share = sum(document_split(d.doc_id, 0.1) == "val" for d in chosen) / len(chosen)
    assert val_share < 0.2


def test_stdlib_source_skips_tests(tmp_path):
    docs = list(iter_documents("stdlib", max_bytes=200_000))
    assert docs
    assert all(d.doc_id.endswith(".py") for d in docs)
    for d in docs:
        parts = d.doc_id.split("/")[:-1]
        assert not {"test", "tests", "site-packages", "__pycache__", "idlelib", "lib2to3"} & set(parts)
    assert [d.doc_id for d in iter_documents("stdlib", max_bytes=200_000)] == [d.doc_id for d in docs]


def test_document_split_is_stable_and_roughly_proportional():
    ids = [f"doc{i}.txt" for i in range(2000)]
    splits = [document_split(i, 0.1) for i in ids]
    assert splits == [document_split(i, 0.1) for i in ids]
    assert 120 < splits.count("val") < 280


def test_fingerprint_changes_with_content_and_config():
    docs = [Document("a", "xy"), Document("b", "z")]
    base = fingerprint(docs, block_size=8)
    assert base == fingerprint(list(docs), block_size=8)
    assert base != fingerprint(docs, block_size=16)
    assert base != fingerprint([Document("a", "x"), Document("b", "yz")], block_size=8)


def _read(f, problems, **policy):
    return read_file(f, policy.get("text_field", "text"), policy.get("on_bad_utf8", "replace"),
                     policy.get("on_bad_json", "fail"), problems)


def test_folder_takes_every_kind_and_globs_select(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("alpha\n")
    (tmp_path / "sub" / "b.jsonl").write_text('{"text": "beta"}\n')
    pq.write_table(pa.table({"text": ["gamma"]}), tmp_path / "sub" / "c.parquet")
    (tmp_path / ".hidden.txt").write_text("hidden\n")
    (tmp_path / "_SUCCESS").write_text("")
    assert [(d.doc_id, d.text) for d in iter_documents(str(tmp_path))] == [
        ("a.txt", "alpha\n"), ("sub/b.jsonl:1", "beta"), ("sub/c.parquet:1", "gamma")]
    assert [d.doc_id for d in iter_documents(str(tmp_path / "**" / "*.jsonl"))] == ["sub/b.jsonl:1"]
    assert [d.doc_id for d in iter_documents(str(tmp_path / "**" / "*.txt"))] == ["a.txt"]
    with pytest.raises(DataError, match=r"no .* files found matching '\*\.md'"):
        list_source(str(tmp_path / "*.md"))


def test_bad_utf8_is_replaced_or_skipped_and_named(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"ok \xff\xfe then more\n")
    (f,) = list_source(str(tmp_path))
    problems = ProblemLog()
    (doc,) = _read(f, problems)
    assert doc.text == "ok \ufffd\ufffd then more\n"
    assert problems.counts == {"replaced_bad_utf8": 1} and "bad.txt" in problems.examples["replaced_bad_utf8"][0]
    problems = ProblemLog()
    assert _read(f, problems, on_bad_utf8="skip") == [] and problems.counts == {"skipped_bad_utf8": 1}


def test_lone_surrogates_never_reach_the_tokenizer(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"text": "a \\ud800 b"}\n{"text": "fine"}\n')
    (f,) = list_source(str(path))
    problems = ProblemLog()
    docs = _read(f, problems)
    assert [d.text for d in docs] == ["a \ufffd b", "fine"]
    assert all(d.text.encode("utf-8") for d in docs)
    assert "s.jsonl:1" in problems.examples["replaced_bad_utf8"][0]
    problems = ProblemLog()
    assert [d.doc_id for d in _read(f, problems, on_bad_utf8="skip")] == ["s.jsonl:2"]
    assert problems.counts == {"skipped_bad_utf8": 1}


def test_bad_json_lines_fail_or_are_counted(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "ok"}\n[1, 2]\n{"text": oops}\n{"text": "end"}\n')
    (f,) = list_source(str(path))
    problems = ProblemLog()
    _read(f, problems)
    assert problems.fatal == [f"{path}:2: expected a JSON object, got list; each line must be one JSON object "
                              "(or set data.on_bad_json=skip)"]
    problems = ProblemLog()
    assert [d.text for d in _read(f, problems, on_bad_json="skip")] == ["ok", "end"]
    assert problems.counts == {"skipped_bad_json": 2} and not problems.fatal


def test_corrupt_parquet_missing_column_and_vanished_file_are_named(tmp_path):
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "good.parquet")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    (tmp_path / "gone.txt").write_text("soon gone\n")
    files = {f.doc_id: f for f in list_source(str(tmp_path))}
    (tmp_path / "gone.txt").unlink()
    for name, pattern in (("good.parquet", r"good\.parquet: no column 'text' \(columns: \['body'\]\)"),
                          ("broken.parquet", r"broken\.parquet: not a readable parquet file"),
                          ("gone.txt", r"gone\.txt: cannot read")):
        problems = ProblemLog()
        assert _read(files[name], problems) == []
        (message,) = problems.fatal
        assert re.search(pattern, message), message
    with pytest.raises(DataError, match=r"broken\.parquet: not a readable parquet file"):
        list(iter_documents(str(tmp_path / "broken.parquet")))
