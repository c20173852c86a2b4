import pytest

from components.files import atomic_write, verify_checksums, write_checksums


def test_checksums_catch_a_changed_or_missing_file(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "config.json").write_text("{}")
    write_checksums(tmp_path)
    verify_checksums(tmp_path)  # intact
    (tmp_path / "model.safetensors").write_bytes(b"weightz")
    with pytest.raises(ValueError, match="model.safetensors: sha256 does not match"):
        verify_checksums(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="model.safetensors"):
        verify_checksums(tmp_path)


def test_no_checksums_file_is_refused(tmp_path):
    with pytest.raises(ValueError, match="refusing to load unverified weights"):
        verify_checksums(tmp_path)


def test_failed_write_leaves_neither_file_nor_temp(tmp_path):
    def explode(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "out.json", explode)
    assert list(tmp_path.iterdir()) == []
