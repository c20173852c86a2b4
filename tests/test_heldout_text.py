"""The data stage writes its validation documents as raw text, and bits per byte reads them (real files)."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
from tokenizers import Tokenizer

from components import heldout_text
from components.artifacts import from_json, to_json
from components.bpb import heldout_texts
from components.config import DataConfig, FinetuneConfig, TokenizerConfig
from components.data import prepare_data
from components.heldout_text import HELDOUT_TEXT_FILE, write_heldout_text
from tests.corpora import write_py_corpus, write_text_corpus


def test_the_validation_documents_are_written_as_text_and_listed(tmp_path: Path):
    corpus, py = write_text_corpus(tmp_path / "corpus"), write_py_corpus(tmp_path / "py")
    data = prepare_data(str(tmp_path / "out"), DataConfig(source=str(corpus), block_size=96, val_fraction=0.2),
                        TokenizerConfig(vocab_size=300), FinetuneConfig(source=str(py), heldout_fraction=0.3))
    assert data.heldout_text_uri == str(tmp_path / "out" / HELDOUT_TEXT_FILE)
    lines = [json.loads(line) for line in Path(data.heldout_text_uri).read_text().splitlines()]
    manifest = json.loads(Path(data.manifest_uri).read_text())
    assert manifest["files"]["heldout_text"] == HELDOUT_TEXT_FILE
    assert manifest["heldout_text"]["documents"] == len(lines) == manifest["splits"]["val"]["documents"]
    n_bytes = sum(len(d["text"].encode()) for d in lines)
    assert manifest["heldout_text"]["bytes"] == n_bytes == manifest["splits"]["val"]["bytes"]
    originals = {p.relative_to(corpus).as_posix(): p.read_text() for p in corpus.rglob("*.txt")}
    for doc in lines:  # each is a val document of the corpus, whole
        assert any(doc["doc_id"].endswith(name) and doc["text"] == text for name, text in originals.items())
    assert [d["doc_id"] for d in lines] == sorted(d["doc_id"] for d in lines)
    tokenizer = Tokenizer.from_str(Path(data.tokenizer_uri).read_text())
    assert heldout_texts(data, tokenizer, 0) == [d["text"] for d in lines]


def test_the_file_is_bounded_and_cut_on_a_character_boundary(tmp_path, monkeypatch):
    monkeypatch.setattr(heldout_text, "HELDOUT_TEXT_MAX_BYTES", 7)
    table = pa.table({"doc_id": ["b", "a"], "text": ["é€€", "abcd"]})
    assert write_heldout_text(str(tmp_path), table) == {"file": HELDOUT_TEXT_FILE, "documents": 2, "bytes": 6}
    texts = [json.loads(line)["text"] for line in (tmp_path / HELDOUT_TEXT_FILE).read_text().splitlines()]
    assert texts == ["abcd", "é"]  # "a" first (doc_id order); 3 bytes left: é (2), not half a €


def test_an_old_data_record_loads_and_reads_its_validation_rows_as_text(tmp_path):
    corpus, py = write_text_corpus(tmp_path / "corpus"), write_py_corpus(tmp_path / "py")
    data = prepare_data(str(tmp_path / "out"), DataConfig(source=str(corpus), block_size=96, val_fraction=0.2),
                        TokenizerConfig(vocab_size=300), FinetuneConfig(source=str(py), heldout_fraction=0.3))
    record = json.loads(to_json(data))
    del record["fields"]["heldout_text_uri"]  # written before the field existed
    old = from_json(json.dumps(record))
    assert old.heldout_text_uri == ""
    tokenizer = Tokenizer.from_str(Path(data.tokenizer_uri).read_text())
    decoded = "".join(heldout_texts(old, tokenizer, 0))
    whole = "".join(heldout_texts(data, tokenizer, 0))
    assert decoded and decoded[:200] in whole  # the packed rows are the val text (tails dropped)


def test_the_first_bytes_of_every_group_merge_into_the_corpus_first_bytes(tmp_path, monkeypatch):
    # Many groups of files, and a bound that the validation documents cross: the file must hold
    # the corpus's first bytes in doc_id order, not some groups' share of them.
    from components import data_passes
    from components.documents import content_hash, hash_split

    corpus, py = tmp_path / "corpus", write_py_corpus(tmp_path / "py")
    corpus.mkdir()
    for i in range(40):
        (corpus / f"doc{i:02d}.txt").write_text(f"document {i}\n" + "word " * (50 + 7 * i))
    monkeypatch.setattr(data_passes, "_MIN_GROUP_BYTES", 1000)
    monkeypatch.setattr(heldout_text, "HELDOUT_TEXT_MAX_BYTES", 1500)
    data = prepare_data(str(tmp_path / "out"), DataConfig(source=str(corpus), block_size=96, val_fraction=0.4),
                        TokenizerConfig(vocab_size=300), FinetuneConfig(source=str(py), heldout_fraction=0.3))
    assert json.loads(Path(data.manifest_uri).read_text())["stats"]["train_documents"] > 10
    val = sorted((p.name, p.read_text()) for p in corpus.iterdir() if hash_split(content_hash(p.read_text()), 0.4) == "val")
    expected, total = [], 0
    for name, text in val:
        if total >= 1500:
            break
        expected.append((name, text[:1500 - total]))
        total += len(expected[-1][1])
    lines = [json.loads(line) for line in Path(data.heldout_text_uri).read_text().splitlines()]
    assert len(lines) >= 3 and len(val) > len(lines)
    assert [(d["doc_id"].rsplit("/", 1)[-1], d["text"]) for d in lines] == expected
