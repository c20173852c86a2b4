"""Tests for components/sft.py: prompt/completion pairs from real files, and their masked rows."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from components.sft import PAD_ID, Pair, extract_function_pairs, tokenize_pairs
from components.sources import DataError
from components.tokenizer import EOT_ID, train_tokenizer
from tests.corpora import PY_SOURCE, sample_text, write_py_corpus


@pytest.fixture
def py_folder(tmp_path: Path) -> Path:
    return write_py_corpus(tmp_path / "py")


def test_extract_function_pairs(tmp_path):
    (tmp_path / "m.py").write_text(PY_SOURCE)
    pairs = extract_function_pairs(str(tmp_path))
    by_name = {p.prompt.split("(")[0].split()[-1]: p for p in pairs}
    assert set(by_name) == {"add", "size", "fetch"}  # only_doc has no body, undocumented has no docstring

    add = by_name["add"]
    assert add.doc_id == "m.py"
    assert add.prompt == 'def add(a, b):\n    """Add two numbers."""\n'  # no decorator
    assert add.completion == "    # a comment that belongs to the body\n    return a + b\n"

    size = by_name["size"]
    assert size.prompt.startswith("    def size(self):") and size.prompt.endswith('Counts them all.\n        """\n')
    assert size.completion == "        n = len(self.items)\n        return n\n"  # indentation kept

    assert by_name["fetch"].prompt.startswith("async def fetch(url):")
    assert extract_function_pairs(str(tmp_path)) == pairs


def test_missing_and_unsupported_sources(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        extract_function_pairs(str(tmp_path / "nope"))
    (tmp_path / "pairs.csv").write_text("prompt,completion\n")
    with pytest.raises(DataError, match="unsupported"):
        extract_function_pairs(str(tmp_path / "pairs.csv"))


def test_extract_function_pairs_max_pairs_and_jsonl(tmp_path, py_folder):
    all_pairs = extract_function_pairs(str(py_folder))
    assert len(all_pairs) == 48  # broken.py skipped
    some = extract_function_pairs(str(py_folder), max_pairs=5)
    assert len(some) == 5 and some == extract_function_pairs(str(py_folder), max_pairs=5)
    assert all(p in all_pairs for p in some)

    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "Q", "completion": "A"}\n{"prompt": "Q2"}\n')
    with pytest.raises(DataError, match=r"p\.jsonl:2"):
        extract_function_pairs(str(path))
    path.write_text('{"prompt": "Q", "completion": "A"}\n')
    assert extract_function_pairs(str(path)) == [Pair("Q", "A", "p.jsonl:1")]


def test_tokenize_pairs_masks():
    tok = train_tokenizer([PY_SOURCE, sample_text(0)], 300)
    short = Pair(prompt="def f():\n", completion="    return 1\n", doc_id="a")
    long_prompt = Pair(prompt="x " * 40, completion="y", doc_id="b")
    tokens, mask = tokenize_pairs([short, long_prompt], tok, block_size=31)
    assert tokens.shape == mask.shape == (1, 32)  # long prompt skipped: no room to learn
    assert tokens.dtype == np.int32 and mask.dtype == np.int8

    p_ids = tok.encode(short.prompt).ids
    c_ids = tok.encode(short.completion).ids
    n = len(p_ids) + len(c_ids) + 1
    assert tokens[0, :n].tolist() == p_ids + c_ids + [EOT_ID]
    assert mask[0, : len(p_ids)].tolist() == [0] * len(p_ids)
    assert mask[0, len(p_ids) : n].tolist() == [1] * (len(c_ids) + 1)  # completion and its EOT
    assert not mask[0, n:].any() and (tokens[0, n:] == PAD_ID).all()

    # Truncation: a long completion fills the row and loses its EOT.
    long_completion = Pair(prompt="def f():\n", completion="    x = 1\n" * 50, doc_id="c")
    tokens, mask = tokenize_pairs([long_completion], tok, block_size=31)
    assert mask[0].sum() == 32 - len(p_ids)
    assert tokens[0, -1] != EOT_ID  # last slot holds a completion token, not EOT
