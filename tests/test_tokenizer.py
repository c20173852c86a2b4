"""Tests for components/tokenizer.py: the trained tokenizer and the vocabulary floor."""
from __future__ import annotations

import pytest

from components.sources import DataError
from components.tokenizer import EOT, EOT_ID, MIN_VOCAB_SIZE, load_tokenizer, train_tokenizer
from tests.corpora import sample_text


def test_train_tokenizer_deterministic_and_round_trips():
    texts = [sample_text(i) for i in range(5)]
    a, b = train_tokenizer(texts, 300), train_tokenizer(texts, 300)
    assert a.to_str() == b.to_str()
    assert a.token_to_id(EOT) == EOT_ID == 0
    text = "unseen bytes: \u00e9\u4e2d\U0001f600 " + EOT
    assert a.decode(a.encode(text).ids, skip_special_tokens=False) == text


def test_min_vocab_size_trains_and_round_trips():
    # At the floor there are no merges: every byte is its own token, and any text still round-trips.
    tok = train_tokenizer([sample_text(0)], MIN_VOCAB_SIZE)
    assert tok.get_vocab_size() == MIN_VOCAB_SIZE
    text = "line 3: \u00e9\u4e2d\U0001f600\n"
    assert tok.decode(tok.encode(text).ids) == text
    # Below the floor the trainer does not refuse; it silently returns the floor.
    assert train_tokenizer([sample_text(0)], MIN_VOCAB_SIZE - 10).get_vocab_size() == MIN_VOCAB_SIZE


def test_load_tokenizer_checks_the_eot_id(tmp_path):
    tok = train_tokenizer([sample_text(0)], 300)
    tok.save(str(tmp_path / "ok.json"))
    assert load_tokenizer(str(tmp_path / "ok.json")).to_str() == tok.to_str()
    from tokenizers import Tokenizer, models

    other = Tokenizer(models.BPE())
    other.add_tokens(["x"])
    other.add_special_tokens([EOT])  # id 1, not EOT_ID
    other.save(str(tmp_path / "other.json"))
    with pytest.raises(DataError, match=r"tokenizer.file=.*other.json.*must be token id 0 \(it is 1\)"):
        load_tokenizer(str(tmp_path / "other.json"))
    with pytest.raises(DataError, match="cannot be read"):
        load_tokenizer(str(tmp_path / "missing.json"))
