"""Tests for components/data.py, the data stage: real files in tmp_path, tiny vocabularies, no mocks."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer

from components.config import DataConfig, FinetuneConfig, TokenizerConfig
from components.data import prepare_data, source_fingerprint
from components.data_plan import plan_routing
from components.documents import hash_split
from components.sources import DataError
from components.tokenizer import EOT, EOT_ID, MIN_VOCAB_SIZE, TOKENIZER_FILE
from tests.corpora import sample_text, write_py_corpus, write_text_corpus


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return write_text_corpus(tmp_path / "corpus")


@pytest.fixture
def py_folder(tmp_path: Path) -> Path:
    return write_py_corpus(tmp_path / "py")


def _read_column(path: str, column: str) -> np.ndarray:
    """A parquet file or a folder of shards, as one (N, L) array."""
    return np.array(pq.read_table(path).column(column).to_pylist())


def test_prepare_data_folder_end_to_end(tmp_path, corpus, py_folder):
    messages = []
    out = tmp_path / "out"
    sections = (DataConfig(source=str(corpus), block_size=96, val_fraction=0.2), TokenizerConfig(vocab_size=300),
                FinetuneConfig(source=str(py_folder), heldout_fraction=0.3))
    data = prepare_data(str(out), *sections, progress=messages.append)

    for uri in (data.sft_train_uri, data.sft_heldout_uri, data.tokenizer_uri, data.manifest_uri):
        assert Path(uri).is_absolute() and Path(uri).is_file()
    for uri in (data.train_uri, data.val_uri):
        assert Path(uri).is_dir() and list(Path(uri).glob("part-*.parquet")), "a folder of shards"
    assert not list(out.rglob(".*tmp*")), "temp files must be renamed away"

    manifest = json.loads(Path(data.manifest_uri).read_text())
    stats = manifest["stats"]
    assert stats == data.stats
    # 8 documents (the .csv is ignored), of which sub/deep.txt repeats doc1.txt word for word.
    assert stats["documents_read"] == 8 and stats["duplicates_dropped"] == 1
    assert manifest["documents"] == {"read": 8, "kept": 7, "dropped": {"duplicate": 1, "outside_max_bytes": 0},
                                     "replaced_bad_utf8": 0}
    assert stats["train_documents"] + stats["val_documents"] == 7
    assert stats["train_documents"] > 0 and stats["val_documents"] > 0
    assert manifest["fingerprint"] == data.fingerprint
    assert manifest["block_size"] == data.block_size == 96
    assert manifest["vocab_size"] == data.vocab_size
    assert manifest["tokenizer"] == TOKENIZER_FILE == Path(data.tokenizer_uri).name
    assert manifest["tokenizer_sha256"] == hashlib.sha256(Path(data.tokenizer_uri).read_bytes()).hexdigest()

    for split in ("train", "val"):
        rows = _read_column(getattr(data, f"{split}_uri"), "tokens")
        # The manifest's counts are the shards' contents, read back.
        assert rows.shape == (stats[f"{split}_rows"], 97)
        assert rows.size == stats[f"{split}_tokens"] == manifest["splits"][split]["tokens"]
        assert 0 <= stats[f"{split}_tail_tokens_dropped"] < 97  # one group: one packing tail per split
        assert rows.max() < data.vocab_size
    assert pq.read_table(data.train_uri).schema.field("tokens").type == pa.list_(pa.uint16())

    for split in ("sft_train", "sft_heldout"):
        table = pq.read_table(getattr(data, f"{split}_uri"))
        assert table.schema.field("mask").type == pa.list_(pa.int8())
        assert table.schema.field("tokens").type == pa.list_(pa.uint16())
        tokens, mask = np.array(table.column("tokens").to_pylist()), np.array(table.column("mask").to_pylist())
        assert tokens.shape == mask.shape == (stats[f"{split}_pairs"], 97)
        assert stats[f"{split}_pairs"] >= 1
    assert stats["sft_train_pairs"] + stats["sft_heldout_pairs"] == 48

    tok = Tokenizer.from_file(data.tokenizer_uri)
    assert tok.token_to_id(EOT) == EOT_ID == manifest["eot_id"]
    text = "line 3: gamma delta, épsilon ünïcode\n\tdone"
    assert tok.decode(tok.encode(text).ids) == text
    assert any(m.startswith("read 8 documents") for m in messages)
    assert any("trained tokenizer" in m for m in messages)

    # Same inputs, same outputs.
    again = prepare_data(str(tmp_path / "out2"), *sections)
    assert again.fingerprint == data.fingerprint
    assert np.array_equal(_read_column(again.train_uri, "tokens"), _read_column(data.train_uri, "tokens"))


def test_prepare_data_single_document_still_gets_val(tmp_path, py_folder):
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "input.txt").write_text(sample_text(1) * 3)
    data = prepare_data(str(tmp_path / "out"), DataConfig(source=str(tmp_path / "one"), block_size=96),
                        TokenizerConfig(vocab_size=280), FinetuneConfig(source=str(py_folder), heldout_fraction=0.3))
    assert data.stats["train_rows"] > 0 and data.stats["val_rows"] > 0


def test_prepare_data_at_the_smallest_vocabulary(tmp_path, corpus, py_folder):
    data = prepare_data(str(tmp_path / "out"), DataConfig(source=str(corpus), block_size=96, val_fraction=0.2),
                        TokenizerConfig(vocab_size=MIN_VOCAB_SIZE),
                        FinetuneConfig(source=str(py_folder), heldout_fraction=0.3))
    assert data.vocab_size == MIN_VOCAB_SIZE
    with pytest.raises(DataError, match=f"tokenizer.vocab_size={MIN_VOCAB_SIZE - 1}: must be at least"):
        prepare_data(str(tmp_path / "out"), DataConfig(source=str(corpus)), TokenizerConfig(MIN_VOCAB_SIZE - 1),
                     FinetuneConfig())


def test_prepare_data_reports_bad_settings_at_once(tmp_path, corpus):
    with pytest.raises(DataError) as err:
        prepare_data(str(tmp_path / "out"), DataConfig(source=str(corpus), block_size=0, val_fraction=1.5),
                     TokenizerConfig(vocab_size=10), FinetuneConfig(max_pairs=-1))
    for key in ("data.block_size", "tokenizer.vocab_size", "data.val_fraction", "finetune.max_pairs"):
        assert key in str(err.value)


def test_prepare_data_too_few_sft_pairs(tmp_path, corpus):
    (tmp_path / "nopy").mkdir()
    with pytest.raises(DataError, match="finetune.source"):
        prepare_data(str(tmp_path / "out"), DataConfig(source=str(corpus), block_size=16),
                     TokenizerConfig(vocab_size=280), FinetuneConfig(source=str(tmp_path / "nopy")))


def test_empty_source_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .txt/.md/.py/.jsonl/.parquet files found"):
        prepare_data(str(tmp_path / "out"), DataConfig(source=str(tmp_path / "empty")), TokenizerConfig(),
                     FinetuneConfig())
    (tmp_path / "empty" / "a.txt").write_text("")
    with pytest.raises(DataError, match=r"no documents found.*1 skipped empty"):
        prepare_data(str(tmp_path / "out"), DataConfig(source=str(tmp_path / "empty")), TokenizerConfig(),
                     FinetuneConfig())


def test_bad_input_is_counted_or_named(tmp_path, py_folder):
    corpus = tmp_path / "mixed"
    corpus.mkdir()
    lines = [json.dumps({"text": sample_text(i)}) for i in range(30)]
    lines[3] = "{not json"
    lines[7] = '{"text": "lone \\ud800 surrogate"}'
    (corpus / "a.jsonl").write_text("\n".join(lines) + "\n")
    (corpus / "b.txt").write_bytes(sample_text(40).encode() + b"\xff\xfe bad bytes\n")
    sections = dict(tokenizer=TokenizerConfig(vocab_size=280), finetune=FinetuneConfig(source=str(py_folder),
                                                                                         heldout_fraction=0.3))
    with pytest.raises(DataError, match=r"a\.jsonl:4: not valid JSON"):
        prepare_data(str(tmp_path / "out"), DataConfig(source=str(corpus), block_size=96), **sections)
    assert not (tmp_path / "out" / "manifest.json").exists()

    data = prepare_data(str(tmp_path / "out"), DataConfig(source=str(corpus), block_size=96, on_bad_json="skip",
                                                          on_bad_utf8="skip"), **sections)
    manifest = json.loads(Path(data.manifest_uri).read_text())
    assert manifest["documents"]["dropped"]["skipped_bad_json"] == 1
    assert manifest["documents"]["dropped"]["skipped_bad_utf8"] == 2  # b.txt and line 8's surrogate
    assert any("b.txt" in m for m in manifest["problems"]["skipped_bad_utf8"])
    assert any("a.jsonl:8" in m for m in manifest["problems"]["skipped_bad_utf8"])
    assert data.stats["documents_read"] == 28

    data = prepare_data(str(tmp_path / "out"), DataConfig(source=str(corpus), block_size=96, on_bad_json="skip"),
                        **sections)
    assert json.loads(Path(data.manifest_uri).read_text())["documents"]["replaced_bad_utf8"] == 2
    assert data.stats["documents_read"] == 30


def test_given_tokenizer_file_and_sample(tmp_path, corpus, py_folder):
    first = prepare_data(str(tmp_path / "a"), DataConfig(source=str(corpus), block_size=96),
                         TokenizerConfig(vocab_size=300), FinetuneConfig(source=str(py_folder), heldout_fraction=0.3))
    messages = []
    again = prepare_data(str(tmp_path / "b"), DataConfig(source=str(corpus), block_size=96),
                         TokenizerConfig(file=first.tokenizer_uri),
                         FinetuneConfig(source=str(py_folder), heldout_fraction=0.3), progress=messages.append)
    assert Path(again.tokenizer_uri).read_bytes() == Path(first.tokenizer_uri).read_bytes()
    assert np.array_equal(_read_column(again.train_uri, "tokens"), _read_column(first.train_uri, "tokens"))
    assert any(m.startswith("loaded tokenizer (300 tokens") for m in messages)

    messages.clear()
    prepare_data(str(tmp_path / "c"), DataConfig(source=str(corpus), block_size=96),
                 TokenizerConfig(vocab_size=300, sample_bytes=2000),
                 FinetuneConfig(source=str(py_folder), heldout_fraction=0.3), progress=messages.append)
    (trained,) = [m for m in messages if m.startswith("trained tokenizer")]
    assert "on 2 training documents" in trained  # of 6, ~1.5 kB each: the second reaches 2000 bytes

    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(DataError, match="tokenizer.file=.*bad.json.*not a tokenizers"):
        prepare_data(str(tmp_path / "d"), DataConfig(source=str(corpus)), TokenizerConfig(file=str(tmp_path / "bad.json")),
                     FinetuneConfig(source=str(py_folder)))


def test_duplicates_keep_the_smallest_id_and_splits_follow_the_content():
    docs = [(f"d{i:03d}", hashlib.sha256(str(i % 40).encode()).digest(), 100) for i in range(120)]
    meta = pa.table({"doc_id": [d for d, _, _ in docs], "sha": [s for _, s, _ in docs], "nbytes": [n for *_, n in docs]})
    plan = plan_routing(meta, DataConfig(val_fraction=0.3), TokenizerConfig(), lambda doc_id: "")
    assert plan.duplicates == 80 and sum(plan.split_documents.values()) == 40
    kept = [d for d, s, _ in docs if plan.routing.kept(d, s)]
    assert kept == [f"d{i:03d}" for i in range(40)], "the first of each content is kept, in any reading order"
    shuffled = meta.take(np.random.default_rng(0).permutation(120))
    assert plan_routing(shuffled, DataConfig(val_fraction=0.3), TokenizerConfig(), lambda doc_id: "") == plan
    for d, s, _ in docs:  # every copy of a text is routed to the same side as the copy that was kept
        assert hash_split(s, 0.3) == plan.routing.route(f"d{int(d[1:]) % 40:03d}", s, "x")[0][0]


def test_source_fingerprint_reads_both_sources(tmp_path, corpus, py_folder):
    data, finetune = DataConfig(source=str(corpus)), FinetuneConfig(source=str(py_folder))
    before = source_fingerprint(data, finetune)
    assert source_fingerprint(data, finetune) == before
    (py_folder / "new.py").write_text("def g():\n    pass\n")
    assert source_fingerprint(data, finetune) != before
    assert source_fingerprint(data, FinetuneConfig(source=str(py_folder), max_pairs=3)) == source_fingerprint(
        data, finetune), "max_pairs selects after reading: the same files are read"
