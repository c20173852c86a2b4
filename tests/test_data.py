"""Tests for components/data.py: real files in tmp_path, tiny vocabularies, no mocks."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer

from components.data import (
    EOT,
    PAD_ID,
    DataError,
    Document,
    Pair,
    document_split,
    extract_function_pairs,
    fingerprint,
    iter_documents,
    pack_rows,
    prepare_data,
    tokenize_pairs,
    train_tokenizer,
)

PY_SOURCE = textwrap.dedent('''\
    import functools


    @functools.cache
    def add(a, b):
        """Add two numbers."""
        # a comment that belongs to the body
        return a + b


    class Box:
        def size(self):
            """How many items.

            Counts them all.
            """
            n = len(self.items)
            return n

        def only_doc(self):
            """No body after me."""


    async def fetch(url):
        """Fetch a url."""
        return await get(url)


    def undocumented(x):
        return x
    ''')


def _text(i: int) -> str:
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    return "\n".join(f"line {j}: " + " ".join(words[(i + j + k) % 8] for k in range(6)) for j in range(40)) + "\n"


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A folder of .txt/.md files plus a nested one and a file type that is ignored."""
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    for i in range(6):
        (root / f"doc{i}.txt").write_text(_text(i))
    (root / "notes.md").write_text("# Notes\n\n" + _text(7))
    (root / "sub" / "deep.txt").write_text(_text(9))
    (root / "ignored.csv").write_text("a,b\n1,2\n")
    return root


@pytest.fixture
def py_folder(tmp_path: Path) -> Path:
    """A folder of .py files with enough documented functions for both SFT splits."""
    root = tmp_path / "py"
    root.mkdir()
    for i in range(12):
        funcs = "\n\n".join(
            f'def f{i}_{k}(x):\n    """Return x plus {k}."""\n    y = x + {k}\n    return y\n' for k in range(4)
        )
        (root / f"mod{i}.py").write_text(funcs)
    (root / "broken.py").write_text("def oops(:\n")
    return root


def _read_column(path: str, column: str) -> np.ndarray:
    return np.array(pq.read_table(path).column(column).to_pylist())


# ---------------------------------------------------------------------------
# prepare_data end to end
# ---------------------------------------------------------------------------


def test_prepare_data_folder_end_to_end(tmp_path, corpus, py_folder):
    messages = []
    out = tmp_path / "out"
    data = prepare_data(
        str(out), source=str(corpus), block_size=96, val_fraction=0.2, vocab_size=300,
        sft_source=str(py_folder), sft_heldout_fraction=0.3, progress=messages.append,
    )

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
    assert manifest["tokenizer"] == "tokenizer.json"

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
    assert tok.token_to_id(EOT) == PAD_ID == 0
    text = "line 3: gamma delta, épsilon ünïcode\n\tdone"
    assert tok.decode(tok.encode(text).ids) == text
    assert any(m.startswith("read 8 documents") for m in messages)
    assert any("trained tokenizer" in m for m in messages)

    # Same inputs, same outputs.
    again = prepare_data(
        str(tmp_path / "out2"), source=str(corpus), block_size=96, val_fraction=0.2, vocab_size=300,
        sft_source=str(py_folder), sft_heldout_fraction=0.3,
    )
    assert again.fingerprint == data.fingerprint
    assert np.array_equal(_read_column(again.train_uri, "tokens"), _read_column(data.train_uri, "tokens"))


def test_prepare_data_single_document_still_gets_val(tmp_path, py_folder):
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "input.txt").write_text(_text(1) * 3)
    data = prepare_data(str(tmp_path / "out"), source=str(tmp_path / "one"), block_size=96, vocab_size=280,
                        sft_source=str(py_folder), sft_heldout_fraction=0.3)
    assert data.stats["train_rows"] > 0 and data.stats["val_rows"] > 0


def test_prepare_data_reports_bad_settings_at_once(tmp_path, corpus):
    with pytest.raises(DataError) as err:
        prepare_data(str(tmp_path / "out"), source=str(corpus), block_size=0, vocab_size=10, val_fraction=1.5)
    for key in ("data.block_size", "tokenizer.vocab_size", "data.val_fraction"):
        assert key in str(err.value)


def test_prepare_data_too_few_sft_pairs(tmp_path, corpus):
    (tmp_path / "nopy").mkdir()
    with pytest.raises(DataError, match="finetune.source"):
        prepare_data(str(tmp_path / "out"), source=str(corpus), block_size=16, vocab_size=280,
                     sft_source=str(tmp_path / "nopy"))


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no documents"):
        prepare_data(str(tmp_path / "out"), source=str(tmp_path / "empty"))


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------


def test_missing_path_and_unsupported_type(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        list(iter_documents(str(tmp_path / "nope")))
    (tmp_path / "data.csv").write_text("text\nhi\n")
    with pytest.raises(DataError, match="unsupported"):
        list(iter_documents(str(tmp_path / "data.csv")))
    with pytest.raises(DataError, match="does not exist"):
        extract_function_pairs(str(tmp_path / "nope"))


def test_folder_documents_sorted_with_relative_ids(corpus):
    ids = [d.doc_id for d in iter_documents(str(corpus))]
    assert ids == sorted(ids)
    assert "sub/deep.txt" in ids and "notes.md" in ids and "ignored.csv" not in ids


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


# ---------------------------------------------------------------------------
# Tokenizer, packing, fingerprint
# ---------------------------------------------------------------------------


def test_train_tokenizer_deterministic_and_round_trips():
    texts = [_text(i) for i in range(5)]
    a, b = train_tokenizer(texts, 300), train_tokenizer(texts, 300)
    assert a.to_str() == b.to_str()
    assert a.token_to_id(EOT) == 0
    text = "unseen bytes: \u00e9\u4e2d\U0001f600 " + EOT
    assert a.decode(a.encode(text).ids, skip_special_tokens=False) == text


def test_pack_rows():
    rows = pack_rows([[1, 2, 3], [4, 5], [6, 7, 8, 9]], block_size=3)
    # stream: 1 2 3 0 4 5 0 6 7 8 9 0 -> 3 rows of 4
    assert rows.dtype == np.int32
    assert rows.tolist() == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]]
    assert pack_rows([[1, 2]], block_size=8).shape == (0, 9)
    assert pack_rows([], block_size=8).shape == (0, 9)


def test_fingerprint_changes_with_content_and_config():
    docs = [Document("a", "xy"), Document("b", "z")]
    base = fingerprint(docs, block_size=8)
    assert base == fingerprint(list(docs), block_size=8)
    assert base != fingerprint(docs, block_size=16)
    assert base != fingerprint([Document("a", "x"), Document("b", "yz")], block_size=8)


# ---------------------------------------------------------------------------
# Supervised pairs
# ---------------------------------------------------------------------------


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
    tok = train_tokenizer([PY_SOURCE, _text(0)], 300)
    short = Pair(prompt="def f():\n", completion="    return 1\n", doc_id="a")
    long_prompt = Pair(prompt="x " * 40, completion="y", doc_id="b")
    tokens, mask = tokenize_pairs([short, long_prompt], tok, block_size=31)
    assert tokens.shape == mask.shape == (1, 32)  # long prompt skipped: no room to learn
    assert tokens.dtype == np.int32 and mask.dtype == np.int8

    p_ids = tok.encode(short.prompt).ids
    c_ids = tok.encode(short.completion).ids
    n = len(p_ids) + len(c_ids) + 1
    assert tokens[0, :n].tolist() == p_ids + c_ids + [PAD_ID]
    assert mask[0, : len(p_ids)].tolist() == [0] * len(p_ids)
    assert mask[0, len(p_ids) : n].tolist() == [1] * (len(c_ids) + 1)  # completion and its EOT
    assert not mask[0, n:].any() and (tokens[0, n:] == PAD_ID).all()

    # Truncation: a long completion fills the row and loses its EOT.
    long_completion = Pair(prompt="def f():\n", completion="    x = 1\n" * 50, doc_id="c")
    tokens, mask = tokenize_pairs([long_completion], tok, block_size=31)
    assert mask[0].sum() == 32 - len(p_ids)
    assert tokens[0, -1] != PAD_ID  # last slot holds a completion token, not EOT
