"""The evaluation suite: pinned from a run's held-out side, never trained on by a later run, re-pinned only on
purpose (real files, the data stage in this process, a real MLflow SQLite store and the real CLI; no Ray)."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient
from tokenizers import Tokenizer

from components.config import DataConfig, FinetuneConfig, TokenizerConfig
from components.data import prepare_data
from components.documents import DataError
from components.suite import SUITE_FILE, pin_from_data, read_suite
from tests.corpora import sample_text, write_py_corpus
from tests.helpers import gptforge


def _corpus(folder: Path, n: int = 30) -> Path:
    folder.mkdir(parents=True)
    for i in range(n):
        (folder / f"doc{i:02d}.txt").write_text(f"document {i}\n" + sample_text(i))
    return folder


def _data(tmp_path: Path, name: str, corpus: Path, py: Path, val_fraction=0.3, heldout_fraction=0.3, suite=None):
    return prepare_data(str(tmp_path / name), DataConfig(source=str(corpus), block_size=96, val_fraction=val_fraction),
                        TokenizerConfig(vocab_size=300), FinetuneConfig(source=str(py), heldout_fraction=heldout_fraction),
                        suite=suite)


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("suite")
    corpus, py = _corpus(tmp / "corpus"), write_py_corpus(tmp / "py")
    data = _data(tmp, "first", corpus, py)
    return {"tmp": tmp, "corpus": corpus, "py": py, "data": data,
            "suite": pin_from_data(data, str(tmp / "suites"), origin="the first run", data_key="k1")}


def _train_text(data) -> str:
    tokenizer = Tokenizer.from_str(Path(data.tokenizer_uri).read_text())
    rows = [row for f in sorted(Path(data.train_uri).glob("*.parquet")) for row in
            pq.read_table(f).column("tokens").to_pylist()]
    return "".join(tokenizer.decode(row) for row in rows)


def test_a_suite_is_the_first_runs_held_out_side_named_after_its_content(first):
    suite, data = first["suite"], first["data"]
    assert Path(suite.uri) == first["tmp"] / "suites" / suite.sha256
    record = json.loads((Path(suite.uri) / SUITE_FILE).read_text())
    assert record["origin"] == "the first run" and record["data_key"] == "k1"
    heldout = [json.loads(line) for line in Path(data.heldout_text_uri).read_text().splitlines()]
    assert len(suite.documents) == len(heldout) > 0 and len(suite.pairs) >= data.stats["sft_heldout_pairs"] > 0
    assert read_suite(suite.uri) == suite
    # The same material pinned again is the same suite, wherever it is copied to.
    again = pin_from_data(data, str(first["tmp"] / "elsewhere"), origin="again")
    assert again.sha256 == suite.sha256 and again.uri != suite.uri
    view = suite.view(data)
    assert view.heldout_text_uri.startswith(suite.uri) and view.train_uri == data.train_uri


def test_a_later_run_never_trains_on_the_suite(first):
    # Another split (most documents would now go to train) and another pair split: without the suite, some of its
    # documents and pairs land on the training side; with it, none do.
    suite, tmp = first["suite"], first["tmp"]
    without = _data(tmp, "without", first["corpus"], first["py"], val_fraction=0.05, heldout_fraction=0.05)
    texts = [json.loads(line)["text"] for line in Path(first["data"].heldout_text_uri).read_text().splitlines()]
    assert any(t[:200] in _train_text(without) for t in texts)  # the test can fail: the overlap is real
    later = _data(tmp, "later", first["corpus"], first["py"], val_fraction=0.05, heldout_fraction=0.05, suite=suite)
    train = _train_text(later)
    assert not any(t[:200] in train for t in texts)
    manifest = json.loads(Path(later.manifest_uri).read_text())
    assert manifest["evaluation_suite"]["sha256"] == suite.sha256
    assert manifest["evaluation_suite"]["documents_sent_to_val"] == len(suite.documents)
    assert set(manifest["sft_heldout_sha256"]) >= {h.hex() for h in suite.pairs}
    assert later.stats["suite_pairs_to_heldout"] == len(suite.pairs) > 0
    assert later.stats["sft_train_pairs"] < without.stats["sft_train_pairs"]


def test_the_suite_changes_nothing_for_the_data_it_was_pinned_from(first):
    # Its documents were already on that data's held-out side: the same shards, so its cache entry still holds.
    again = _data(first["tmp"], "same", first["corpus"], first["py"], suite=first["suite"])
    for split in ("train", "val"):
        ours = sorted(Path(again.root, split).glob("*.parquet"))
        assert [p.read_bytes() for p in ours] == [p.read_bytes() for p in
                                                  sorted(Path(first["data"].root, split).glob("*.parquet"))]
    assert Path(again.sft_train_uri).read_bytes() == Path(first["data"].sft_train_uri).read_bytes()


def test_a_suite_edited_by_hand_is_refused_naming_the_file(first, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(first["suite"].uri, copy)
    with open(copy / "heldout_text.jsonl", "a") as f:
        f.write(json.dumps({"doc_id": "extra", "text": "easy text", "sha": "00"}) + "\n")
    with pytest.raises(DataError, match="heldout_text.jsonl: changed since the suite was pinned"):
        read_suite(str(copy))
    with pytest.raises(DataError, match="no suite.json"):
        read_suite(str(tmp_path))


def test_the_cache_key_takes_the_suite_only_where_it_changes_the_output(first):
    from components.experiment_file import load_config
    from pipelines import stage_cache
    from pipelines.llm_pipeline import _data_key

    cfg = load_config(None, [])
    plain = stage_cache.stage_key("prepare_data", cfg, data_fingerprint="fp")
    from dataclasses import replace

    assert _data_key(cfg, "fp", None) == plain
    assert _data_key(cfg, "fp", replace(first["suite"], data_key=plain)) == plain
    assert _data_key(cfg, "fp", first["suite"]) != plain


def test_suite_pin_and_show_through_the_cli(first, tmp_path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    args = ["name=pinned", f"workdir={workdir}"]
    shown = gptforge("suite", "show", *args, cwd=tmp_path)
    assert shown.returncode == 0 and "no evaluation suite yet" in shown.stdout, shown.stderr
    missing = gptforge("suite", "pin", str(first["data"].root), *args, cwd=tmp_path)
    assert missing.returncode == 2 and "--reason" in missing.stderr
    bad = gptforge("suite", "pin", str(tmp_path), "--reason", "x", *args, cwd=tmp_path)
    assert bad.returncode == 2 and "neither a suite" in bad.stderr and "Traceback" not in bad.stderr
    pinned = gptforge("suite", "pin", str(first["data"].root), "--reason", "a cleaner corpus", *args, cwd=tmp_path)
    assert pinned.returncode == 0, pinned.stderr
    assert first["suite"].sha256 in pinned.stdout  # the same held-out material: the same suite
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    experiment = client.get_experiment_by_name("pinned")
    assert experiment.tags["gptforge.suite.sha256"] == first["suite"].sha256
    assert experiment.tags["gptforge.suite.reason"] == "a cleaner corpus"
    (run,) = client.search_runs([experiment.experiment_id], "tags.mlflow.runName = 'suite-pin'")
    assert run.data.tags["suite.reason"] == "a cleaner corpus" and run.info.status == "FINISHED"
    shown = gptforge("suite", "show", *args, cwd=tmp_path)
    assert first["suite"].sha256 in shown.stdout and "a cleaner corpus" in shown.stdout
