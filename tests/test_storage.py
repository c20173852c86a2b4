"""components/storage.py against local folders and a real S3 server (moto on 127.0.0.1)."""
from __future__ import annotations

import os

import pytest

from components import storage
from components.files import IntegrityError, write_checksums
from tests.cluster_processes import S3Server


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("s3"))
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)  # pyarrow reads the endpoint and credentials from the environment
    try:
        yield server
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


def _model_folder(folder) -> str:
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights" * 100)
    (folder / "config.json").write_text("{}")
    return write_checksums(folder)


def test_locations_join_and_normalize(tmp_path):
    assert storage.join("s3://bucket/prefix/", "runs", "/abc/") == "s3://bucket/prefix/runs/abc"
    assert storage.normalize(f"file://{tmp_path}") == str(tmp_path)
    assert storage.is_remote("s3://b/p") and not storage.is_remote(str(tmp_path)) and not storage.is_remote("file:///x")


def test_a_remote_folder_is_copied_verified_and_a_damaged_cached_copy_fetched_again(s3, tmp_path, monkeypatch):
    monkeypatch.setenv("GPTFORGE_CACHE", str(tmp_path / "cache"))
    pin = _model_folder(tmp_path / "model")
    location = storage.upload_folder(tmp_path / "model", "s3://gptforge/models/m1")
    assert sorted(storage.file_sizes(location)) == ["checksums.json", "config.json", "model.safetensors"]
    local = storage.local_copy(location, ("model.safetensors", "config.json"), pin)
    assert (local / "model.safetensors").read_bytes() == b"weights" * 100
    (local / "model.safetensors").write_bytes(b"tampered")  # the cached copy damaged on this node
    again = storage.local_copy(location, ("model.safetensors", "config.json"), pin)
    assert (again / "model.safetensors").read_bytes() == b"weights" * 100


def test_a_remote_folder_that_does_not_match_its_pin_is_refused(s3, tmp_path, monkeypatch):
    monkeypatch.setenv("GPTFORGE_CACHE", str(tmp_path / "cache"))
    _model_folder(tmp_path / "model")
    location = storage.upload_folder(tmp_path / "model", "s3://gptforge/models/m2")
    with pytest.raises(IntegrityError, match="pinned"):
        storage.local_copy(location, ("model.safetensors", "config.json"), "0" * 64)
    assert not any((tmp_path / "cache" / "folders").iterdir())  # nothing unverified left in the cache


def test_a_missing_bucket_is_named_before_any_work(s3):
    with pytest.raises(storage.StorageError, match="storage=s3://no-such-bucket/x: cannot write there.*no-such-bucket"):
        storage.check_writable("s3://no-such-bucket/x")
    storage.check_writable("s3://gptforge/ok")
    assert storage.find_files("s3://gptforge/ok", "x") == []  # the probe object is gone again


def test_staged_uploads_only_a_block_that_finished(s3, tmp_path):
    with storage.staged("s3://gptforge/staged/good") as folder:
        (folder / "a.txt").write_text("a")
    assert storage.read_text("s3://gptforge/staged/good/a.txt") == "a"
    with pytest.raises(RuntimeError):
        with storage.staged("s3://gptforge/staged/bad") as folder:
            (folder / "a.txt").write_text("half")
            raise RuntimeError("the stage failed")
    assert not storage.exists("s3://gptforge/staged/bad/a.txt")
    with pytest.raises(RuntimeError):
        with storage.staged(str(tmp_path / "local")):
            raise RuntimeError("the stage failed")
    assert not (tmp_path / "local").exists()  # a folder it made is removed again


def test_find_files_lists_nested_files_on_both_kinds_of_storage(s3, tmp_path):
    for base in (str(tmp_path / "runs"), "s3://gptforge/find"):
        storage.write_bytes(storage.join(base, "a", "checkpoint.json"), b"{}")
        storage.write_bytes(storage.join(base, "a", "b", "checkpoint.json"), b"{}")
        storage.write_bytes(storage.join(base, "c", "other.json"), b"{}")
        assert storage.find_files(base, "checkpoint.json") == [storage.join(base, "a", "b", "checkpoint.json"),
                                                               storage.join(base, "a", "checkpoint.json")]
