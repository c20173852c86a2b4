"""Stage cache keys and the completeness check, without Ray or MLflow (the cache hit itself: tests/test_jobs.py)."""
import importlib.util
import json
from pathlib import Path

import pytest

from components.artifacts import Checkpoint
from components.config import DataConfig, FinetuneConfig, TokenizerConfig
from components.data import prepare_data, source_fingerprint
from components.experiment_file import load_config
from pipelines.stage_cache import CACHED_STAGES, code_modules, code_version, output_complete, stage_key
from tests.helpers import TINY_EXPERIMENT


def _keys(*overrides, fingerprint="fp"):
    cfg = load_config(TINY_EXPERIMENT, list(overrides))
    data = stage_key("prepare_data", cfg, data_fingerprint=fingerprint)
    pretrain = stage_key("pretrain", cfg, (data,))
    finetune = stage_key("finetune", cfg, (data, pretrain))
    return data, pretrain, finetune


def test_a_key_changes_with_its_section_and_its_inputs_only():
    base = _keys()
    assert _keys() == base  # stable
    lr = _keys("finetune.lr=5e-3")
    assert lr[:2] == base[:2] and lr[2] != base[2]
    steps = _keys("pretrain.max_steps=7")
    assert steps[0] == base[0] and steps[1] != base[1] and steps[2] != base[2]  # finetune's input changed
    data = _keys(fingerprint="other data")
    assert all(a != b for a, b in zip(data, base))
    sft = _keys("finetune.max_pairs=10")  # read by the data stage too
    assert sft[0] != base[0]
    # What does not change a stage's output does not change its key.
    assert _keys("evaluate.max_batches=3", "ray_num_cpus=2", "workdir=/elsewhere", "pretrain.cache=false") == base


def _reading(module: str, edit):
    """A source reader that returns `module`'s source changed by `edit` and every other file as it is."""
    target = Path(importlib.util.find_spec(module).origin).resolve()

    def read(path: Path) -> bytes:
        source = path.read_bytes()
        return edit(source) if path.resolve() == target else source

    return read


def test_the_training_stages_hash_every_module_they_import():
    pretrain = code_modules("pretrain")
    # Imported only by the recipe (components.tensor_parallel) or for a constant (components.config).
    assert {"components.tensor_parallel", "components.config", "components.parallel", "components.train",
            "components.model", "components.checkpoint", "pipelines.ray_runtime", "pipelines.stages"} <= set(pretrain)
    assert "components.finetune" in code_modules("finetune")
    assert "components.data" in code_modules("prepare_data")


@pytest.mark.parametrize("stage", CACHED_STAGES)
def test_an_edit_to_any_module_a_stage_imports_changes_its_key(stage):
    base = code_version(stage)
    for module in code_modules(stage):
        assert code_version(stage, _reading(module, lambda source: source + b"\n# edited\n")) != base, module


def test_imports_inside_functions_count_and_other_modules_do_not():
    assert "components.generation" not in code_modules("pretrain")  # serving's code, not training's
    assert code_version("pretrain", _reading("components.generation", lambda s: s + b"\n# edited\n")) \
        == code_version("pretrain")
    lazy = _reading("pipelines.ray_runtime",
                    lambda s: s + b"\n\ndef _later():\n    from components import generation\n")
    assert "components.generation" in code_modules("pretrain", lazy)
    assert code_version("pretrain", lazy) != code_version("pretrain")


def test_source_fingerprint_follows_the_folder(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("first document\n")
    sections = DataConfig(source=str(corpus)), FinetuneConfig(source=str(corpus))
    before = source_fingerprint(*sections)
    assert source_fingerprint(*sections) == before
    (corpus / "b.txt").write_text("a new document\n")
    assert source_fingerprint(*sections) != before


def test_output_complete_needs_every_file(tmp_path):
    data = prepare_data(str(tmp_path / "data"), DataConfig(max_bytes=200_000, block_size=128),
                        TokenizerConfig(vocab_size=300), FinetuneConfig(max_bytes=300_000, max_pairs=200))
    assert output_complete(data)
    (shard,) = (tmp_path / "data" / "val").glob("*.parquet")
    shard.unlink()  # one shard gone, the manifest still there
    assert not output_complete(data)

    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"x" * 10)
    (folder / "checkpoint.json").write_text(json.dumps({"step": 3, "files": {"model.safetensors": 10}}))
    assert output_complete(Checkpoint(str(folder), 3))
    (folder / "model.safetensors").write_bytes(b"x" * 5)  # cut short
    assert not output_complete(Checkpoint(str(folder), 3))
    assert not output_complete(Checkpoint(str(tmp_path / "gone"), 3))
