"""The data stage on Ray Data (pipelines/data_prep.py): a real local Ray of 2 CPUs, real files, and a
real S3 API (moto's server) for sources and outputs on object storage."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from components import storage
from components.config import DataConfig, FinetuneConfig, TokenizerConfig
from components.data import prepare_data as prepare_in_process
from tests.corpora import sample_text, write_py_corpus


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server; its endpoint and keys are in the environment before Ray starts, so workers see them."""
    from tests.cluster_processes import S3Server

    server = S3Server(tmp_path_factory.mktemp("s3"))
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    yield server
    for k, v in saved.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    server.stop()


@pytest.fixture(scope="module")
def ray_2cpus(s3):
    from pipelines import ray_runtime

    ray_runtime.init_ray(num_cpus=2)
    yield
    ray_runtime.shutdown_ray()


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory) -> Path:
    """~1.2 MB in 60 files: two groups of files, so the passes run as several tasks."""
    root = tmp_path_factory.mktemp("big")
    for i in range(60):
        (root / f"doc{i:02d}.txt").write_text(sample_text(i) * 12 + f"document {i}\n")
    return root


def _sections(source: str, py: Path, **data):
    return (DataConfig(source=source, block_size=96, val_fraction=0.1, **data), TokenizerConfig(vocab_size=300),
            FinetuneConfig(source=str(py), heldout_fraction=0.3))


def test_ray_data_path_writes_what_one_process_writes(ray_2cpus, tmp_path, big_corpus):
    from pipelines.data_prep import prepare_data

    py = write_py_corpus(tmp_path / "py")
    on_ray = prepare_data(str(tmp_path / "ray"), *_sections(str(big_corpus), py))
    alone = prepare_in_process(str(tmp_path / "one"), *_sections(str(big_corpus), py))
    assert on_ray.fingerprint == alone.fingerprint and on_ray.stats == alone.stats
    for split in ("train", "val"):
        shards = sorted(p.name for p in (tmp_path / "ray" / split).iterdir())
        assert len(shards) >= 2 and shards == sorted(p.name for p in (tmp_path / "one" / split).iterdir())
        for name in shards:
            assert (tmp_path / "ray" / split / name).read_bytes() == (tmp_path / "one" / split / name).read_bytes()
    # The training workers read the folder of shards with Ray Data; the manifest's counts are what they hold.
    import ray.data

    from components.train import rows_from_arrow

    manifest = json.loads(Path(on_ray.manifest_uri).read_text())
    rows = np.concatenate([rows_from_arrow(b)["tokens"] for b in
                           ray.data.read_parquet(on_ray.train_uri).iter_batches(batch_format="pyarrow")])
    assert rows.dtype == np.int64 and rows.shape == (manifest["stats"]["train_rows"], 97)
    assert rows.size == manifest["splits"]["train"]["tokens"]
    assert manifest["splits"]["train"]["tail_tokens_dropped"] < 3 * 97  # at most a row's worth per group


def test_sources_and_outputs_on_object_storage(ray_2cpus, s3, tmp_path):
    from components.evaluate import _read_rows
    from pipelines.data_prep import prepare_data

    lines = [json.dumps({"body": sample_text(i)}) for i in range(40)] + ["{broken"]
    s3.client().put_object(Bucket=s3.bucket, Key="corpus/part-0.jsonl", Body="\n".join(lines).encode())
    py = write_py_corpus(tmp_path / "py")
    location = f"s3://{s3.bucket}/runs/r1/prepare_data"
    data = prepare_data(location, *_sections(f"s3://{s3.bucket}/corpus/*.jsonl", py, text_field="body",
                                             on_bad_json="skip"))
    assert data.root == location and data.train_uri == f"{location}/train"
    keys = s3.keys("runs/r1/prepare_data/")
    assert "runs/r1/prepare_data/manifest.json" in keys and "runs/r1/prepare_data/sft_train.parquet" in keys
    assert any(k.startswith("runs/r1/prepare_data/train/part-") for k in keys)
    manifest = json.loads(storage.read_text(data.manifest_uri))
    assert manifest["documents"]["dropped"]["skipped_bad_json"] == 1
    assert any("part-0.jsonl:41" in m for m in manifest["problems"]["skipped_bad_json"])

    val = _read_rows(data.val_uri, ["tokens"], None)["tokens"]  # evaluate reads shards through pyarrow.fs
    assert val.shape == (manifest["stats"]["val_rows"], 97) and val.size == manifest["splits"]["val"]["tokens"]
    fs, path = storage.resolve(data.sft_heldout_uri)
    assert pq.read_table(path, filesystem=fs).num_rows == manifest["stats"]["sft_heldout_pairs"]


def test_bad_input_on_ray_is_a_data_error_naming_the_line(ray_2cpus, tmp_path):
    from components.sources import DataError
    from pipelines.data_prep import prepare_data

    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.jsonl").write_text('{"text": "ok"}\n{"other": "no text"}\n')
    with pytest.raises(DataError, match=r"a\.jsonl:2: object has no field 'text'"):
        prepare_data(str(tmp_path / "out"), *_sections(str(tmp_path / "c"), write_py_corpus(tmp_path / "py")))
