"""Atomic writes and the integrity check of model folders (pure: no Ray, no MLflow)."""
import json
import os
import shutil

import pytest

from components.files import (CHECKSUMS_FILE, IntegrityError, atomic_write, read_verified, sha256_file,
                              verify_checksums, write_checksums)

FILES = ("model.safetensors", "config.json", "tokenizer.json")


def _candidate(folder, weights=b"weights"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.safetensors").write_bytes(weights)
    (folder / "config.json").write_text("{}")
    (folder / "tokenizer.json").write_text('{"model": {}}')
    return write_checksums(folder)


def test_an_intact_folder_passes_and_its_pin_is_the_sha256_of_checksums_json(tmp_path):
    pin = _candidate(tmp_path)
    assert pin == sha256_file(tmp_path / CHECKSUMS_FILE)
    verify_checksums(tmp_path, FILES)
    verify_checksums(tmp_path, FILES, pin)


def test_a_changed_or_missing_file_is_named(tmp_path):
    _candidate(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"weightz")
    with pytest.raises(IntegrityError, match="model.safetensors: sha256 does not match"):
        verify_checksums(tmp_path, FILES)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(IntegrityError, match="model.safetensors: missing"):
        verify_checksums(tmp_path, FILES)


def test_an_emptied_checksums_json_is_refused(tmp_path):
    _candidate(tmp_path)
    (tmp_path / CHECKSUMS_FILE).write_text("{}")
    with pytest.raises(IntegrityError) as info:
        verify_checksums(tmp_path, FILES)
    for name in FILES:
        assert f"{name}: not listed in {CHECKSUMS_FILE}" in str(info.value)


def test_weights_swapped_for_another_candidates_are_refused(tmp_path):
    _candidate(tmp_path / "fp32", b"fp32 weights")
    _candidate(tmp_path / "int8", b"int8 weights")
    shutil.copy(tmp_path / "int8" / "model.safetensors", tmp_path / "fp32" / "model.safetensors")
    with pytest.raises(IntegrityError, match="model.safetensors: sha256 does not match"):
        verify_checksums(tmp_path / "fp32", FILES)


def test_weights_and_checksums_swapped_together_fail_only_the_registry_pin(tmp_path):
    pin = _candidate(tmp_path / "fp32", b"fp32 weights")
    _candidate(tmp_path / "int8", b"int8 weights")
    for name in ("model.safetensors", CHECKSUMS_FILE):
        shutil.copy(tmp_path / "int8" / name, tmp_path / "fp32" / name)
    verify_checksums(tmp_path / "fp32", FILES)  # consistent with itself: why the registry pins the hash
    with pytest.raises(IntegrityError, match=rf"{CHECKSUMS_FILE}: sha256 does not match the one pinned"):
        verify_checksums(tmp_path / "fp32", FILES, pin)


def test_an_extra_file_is_refused(tmp_path):
    _candidate(tmp_path)
    (tmp_path / "evil.py").write_text("import os")
    with pytest.raises(IntegrityError, match="evil.py: unexpected file"):
        verify_checksums(tmp_path, FILES)
    write_checksums(tmp_path)  # listed, but still not part of the format
    with pytest.raises(IntegrityError, match="evil.py: listed in checksums.json but not part of this model format"):
        verify_checksums(tmp_path, FILES)


@pytest.mark.parametrize("name", ["../../etc/hostname", "/etc/hostname", "..", "sub/model.safetensors", ""])
def test_a_name_that_is_not_a_plain_file_name_is_refused(tmp_path, name):
    folder = tmp_path / "a" / "b"
    _candidate(folder)
    sums = json.loads((folder / CHECKSUMS_FILE).read_text())
    sums[name] = sha256_file("/etc/hostname") if os.path.exists("/etc/hostname") else "0" * 64
    (folder / CHECKSUMS_FILE).write_text(json.dumps(sums))
    with pytest.raises(IntegrityError, match=f"{name!r} is not a plain file name"):
        verify_checksums(folder, FILES)


def test_a_symlink_is_not_a_model_file(tmp_path):
    _candidate(tmp_path / "real")
    link = tmp_path / "linked"
    shutil.copytree(tmp_path / "real", link)
    (link / "config.json").unlink()
    (link / "config.json").symlink_to(tmp_path / "real" / "config.json")  # same bytes, outside the folder
    with pytest.raises(IntegrityError, match="config.json: missing"):
        verify_checksums(link, FILES)


def test_no_or_unreadable_checksums_file_is_refused(tmp_path):
    with pytest.raises(IntegrityError, match="refusing to load unverified weights"):
        verify_checksums(tmp_path, FILES)
    (tmp_path / CHECKSUMS_FILE).write_text("[1, 2]")
    with pytest.raises(IntegrityError, match="expected a mapping"):
        verify_checksums(tmp_path, FILES)


def test_failed_write_leaves_neither_file_nor_temp(tmp_path):
    def explode(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "out.json", explode)
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_fsyncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    synced = []  # (inode, was the final name present yet)
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append((os.fstat(fd).st_ino, (tmp_path / "out.json").exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    atomic_write(tmp_path / "out.json", lambda tmp: tmp.write_text("data"))
    file_inode, folder_inode = (tmp_path / "out.json").stat().st_ino, tmp_path.stat().st_ino
    assert synced == [(file_inode, False), (folder_inode, True)]
    assert (tmp_path / "out.json").read_text() == "data"


def test_read_verified_returns_the_bytes_it_checked_and_refuses_what_verify_refuses(tmp_path):
    pin = _candidate(tmp_path, weights=b"the weights")
    contents = read_verified(tmp_path, FILES, pin)
    assert contents == {"model.safetensors": b"the weights", "config.json": b"{}", "tokenizer.json": b'{"model": {}}'}
    (tmp_path / "config.json").write_text('{"n_layer": 1}')
    with pytest.raises(IntegrityError, match="config.json: sha256 does not match"):
        read_verified(tmp_path, FILES, pin)
    _candidate(tmp_path)
    with pytest.raises(IntegrityError, match="does not match the one pinned"):
        read_verified(tmp_path, FILES, pin)


def test_read_verified_does_not_follow_a_symlink(tmp_path):
    pin = _candidate(tmp_path / "a")
    real = tmp_path / "elsewhere.json"
    real.write_text("{}")
    (tmp_path / "a" / "config.json").unlink()
    (tmp_path / "a" / "config.json").symlink_to(real)  # the same bytes, but not a file of the folder
    with pytest.raises(IntegrityError, match="config.json: missing"):
        read_verified(tmp_path / "a", FILES, pin)
