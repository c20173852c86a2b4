"""A model folder is loaded from the bytes that were checked: no window between the check and the load."""
import json

import pytest
import torch
from tokenizers import Tokenizer

from components import files
from components.files import IntegrityError
from pipelines.model_loading import FolderLoader
from tests.helpers import make_candidate


def _rewrite_after_each_check(monkeypatch, folder, change):
    """Run `change(folder)` right after every integrity check returns, as someone rewriting the folder
    between the check and the load would."""
    for name in ("verify_checksums", "read_verified"):
        check = getattr(files, name, None)
        if check is None:
            continue

        def checked_then_changed(*args, _check=check, **kwargs):
            result = _check(*args, **kwargs)
            change(folder)
            return result

        monkeypatch.setattr(files, name, checked_then_changed)


@pytest.mark.parametrize("variant", ["fp32", "bf16", "int8_dynamic", "int8_weight_only"])
def test_a_config_rewritten_after_the_check_is_not_what_loads(tmp_path, monkeypatch, variant):
    folder = tmp_path / "candidate"
    pin = make_candidate(folder, variant)
    checked_config = json.loads((folder / "config.json").read_text())

    def shrink_the_model(folder):  # a smaller model and another variant: what the weights were not checked with
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "n_layer": 1, "quantization": "bf16"}))

    _rewrite_after_each_check(monkeypatch, folder, shrink_the_model)
    loaded = FolderLoader(str(folder), "tiny:v1", pin)()
    assert loaded.model.config.n_layer == checked_config["n_layer"] == 2
    assert loaded.precision == variant
    assert loaded.tokenizer.get_vocab() == Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab()
    logits = loaded.model(torch.tensor([loaded.tokenizer.encode("def add(a, b):").ids]))[0]
    assert logits.shape[-1] == 300 and torch.isfinite(logits).all()
    # The rewrite itself is caught by the next load.
    with pytest.raises(IntegrityError, match="config.json: sha256 does not match"):
        FolderLoader(str(folder), "tiny:v1", pin)()


def test_read_verified_returns_the_checked_bytes_of_a_real_candidate(tmp_path):
    from components.quantize import CANDIDATE_FILES

    pin = make_candidate(tmp_path / "c")
    contents = files.read_verified(tmp_path / "c", CANDIDATE_FILES, pin)
    assert sorted(contents) == sorted(CANDIDATE_FILES)
    assert all(contents[name] == (tmp_path / "c" / name).read_bytes() for name in CANDIDATE_FILES)


def test_a_candidate_registered_before_chat_templates_still_loads(tmp_path):
    # Candidates made before tokenizer_config.json was part of the format hold only the other three.
    make_candidate(tmp_path / "c")
    (tmp_path / "c" / "tokenizer_config.json").unlink()
    (tmp_path / "c" / "checksums.json").unlink()
    pin = files.write_checksums(tmp_path / "c")
    loader = FolderLoader(str(tmp_path / "c"), checksums_sha256=pin)
    loader.verify()
    assert loader("cpu").chat_template is None


def test_a_listed_template_that_was_deleted_is_refused(tmp_path):
    pin = make_candidate(tmp_path / "c")
    (tmp_path / "c" / "tokenizer_config.json").unlink()
    with pytest.raises(IntegrityError, match="tokenizer_config.json"):
        FolderLoader(str(tmp_path / "c"), checksums_sha256=pin).verify()
