"""Tests for components/data.py, the data stage: real files in tmp_path, tiny vocabularies, no mocks."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer

from components.config import DataConfig, FinetuneConfig, TokenizerConfig
from components.data import prepare_data, source_fingerprint
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
    return np.array(pq.read_table(path).column(column).to_pylist())


def test_prepare_data_folder_end_to_end(tmp_path, corpus, py_folder):
    messages = []
    out = tmp_path / "out"
    sections = (DataConfig(source=str(corpus), block_size=96, val_fraction=0.2), TokenizerConfig(vocab_size=300),
                FinetuneConfig(source=str(py_folder), heldout_fraction=0.3))
    data = prepare_data(str(out), *sections, progress=messages.append)

    for uri in (data.train_uri, data.val_uri, data.sft_train_uri, data.sft_heldout_uri,
                data.tokenizer_uri, data.manifest_uri):
        assert Path(uri).is_absolute() and Path(uri).is_file()
    assert not list(out.glob(".*tmp*")), "temp files must be renamed away"

    manifest = json.loads(Path(data.manifest_uri).read_text())
    stats = manifest["stats"]
    assert stats == data.stats
    assert stats["train_documents"] + stats["val_documents"] == 8  # the .csv is ignored
    assert stats["train_documents"] > 0 and stats["val_documents"] > 0
    assert manifest["fingerprint"] == data.fingerprint
    assert manifest["block_size"] == data.block_size == 96
    assert manifest["vocab_size"] == data.vocab_size
    assert manifest["tokenizer"] == TOKENIZER_FILE == Path(data.tokenizer_uri).name

    for split in ("train", "val"):
        rows = _read_column(getattr(data, f"{split}_uri"), "tokens")
        assert rows.shape == (stats[f"{split}_rows"], 97)
        assert stats[f"{split}_rows"] == stats[f"{split}_tokens"] // 97
        assert rows.max() < data.vocab_size
    assert pq.read_table(data.train_uri).schema.field("tokens").type == pa.list_(pa.int32())

    for split in ("sft_train", "sft_heldout"):
        table = pq.read_table(getattr(data, f"{split}_uri"))
        assert table.schema.field("mask").type == pa.list_(pa.int8())
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


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no documents"):
        prepare_data(str(tmp_path / "out"), DataConfig(source=str(tmp_path / "empty")), TokenizerConfig(),
                     FinetuneConfig())


def test_source_fingerprint_reads_both_sources(tmp_path, corpus, py_folder):
    data, finetune = DataConfig(source=str(corpus)), FinetuneConfig(source=str(py_folder))
    before = source_fingerprint(data, finetune)
    assert source_fingerprint(data, finetune) == before
    (py_folder / "new.py").write_text("def g():\n    pass\n")
    assert source_fingerprint(data, finetune) != before
    assert source_fingerprint(data, FinetuneConfig(source=str(py_folder), max_pairs=3)) == source_fingerprint(
        data, finetune), "max_pairs selects after reading: the same files are read"
