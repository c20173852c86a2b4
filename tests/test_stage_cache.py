"""Stage cache keys and the completeness check, without Ray or MLflow (the cache hit itself: tests/test_jobs.py)."""
import json

from components.artifacts import Checkpoint
from components.config import load_config
from components.data import prepare_data, source_fingerprint
from pipelines.stage_cache import output_complete, stage_key
from tests.conftest import TINY_EXPERIMENT


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


def test_source_fingerprint_follows_the_folder(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("first document\n")
    before = source_fingerprint(str(corpus), sft_source=str(corpus))
    assert source_fingerprint(str(corpus), sft_source=str(corpus)) == before
    (corpus / "b.txt").write_text("a new document\n")
    assert source_fingerprint(str(corpus), sft_source=str(corpus)) != before


def test_output_complete_needs_every_file(tmp_path):
    data = prepare_data(str(tmp_path / "data"), max_bytes=200_000, block_size=128, vocab_size=300,
                        sft_max_bytes=300_000, sft_max_pairs=200)
    assert output_complete(data)
    (tmp_path / "data" / "val.parquet").unlink()
    assert not output_complete(data)

    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"x" * 10)
    (folder / "checkpoint.json").write_text(json.dumps({"step": 3, "files": {"model.safetensors": 10}}))
    assert output_complete(Checkpoint(str(folder), 3))
    (folder / "model.safetensors").write_bytes(b"x" * 5)  # cut short
    assert not output_complete(Checkpoint(str(folder), 3))
    assert not output_complete(Checkpoint(str(tmp_path / "gone"), 3))
