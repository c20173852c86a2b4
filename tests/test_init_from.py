"""Fine-tuning from any starting point: `finetune.init_from` and `pretrain.enabled`.

The fast tests check the settings, the lineage tags, the cache key, the copy of a starting model
and the data stage on its tokenizer, in this process. The two at the end run the real pipeline
through the CLI (Ray, MLflow): from a Hugging Face GPT-2 folder with pretraining off, then from
`models:/NAME@champion` that the first run registered.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from mlflow import MlflowClient

from components import data as data_lib
from components.base_model import registry_ref
from components.config import DataConfig, FinetuneConfig, TokenizerConfig
from components.experiment_file import ConfigError, load_config
from components.model import GPT, GPTConfig
from components.tokenizer import EOT, TOKENIZER_FILE
from pipelines import init_from, stage_cache
from pipelines.tracking import STAGE_TAG, resolve_tracking_uri
from tests.corpora import sample_text
from tests.helpers import TINY_EXPERIMENT, gptforge
from tests.test_hf_interop import _hf_folder  # a random GPT2LMHeadModel + a GPT-2 style tokenizer, no download


def _pairs(path: Path, n: int = 60) -> str:
    """Short prompt/completion pairs: the test model's 32 positions hold a whole one."""
    path.write_text("".join(json.dumps({"prompt": f"add {i} and 1:", "completion": f" {i + 1}\n"}) + "\n"
                            for i in range(n)))
    return str(path)


# ----------------------------------------------------------------------------- settings


def _problems(*overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(None, list(overrides))
    return str(info.value)


def test_pretrain_disabled_needs_a_starting_model():
    message = _problems("pretrain.enabled=false")
    assert "pretrain.enabled" in message and "finetune.init_from" in message


def test_a_bad_registry_reference_is_named():
    message = _problems("finetune.init_from=models:/tiny@", "pretrain.enabled=false")
    assert "finetune.init_from: 'models:/tiny@' is not a registry reference" in message
    assert "models:/NAME/VERSION" in message


def test_a_starting_model_with_pretraining_or_a_tokenizer_file_is_refused():
    assert "set pretrain.enabled: false" in _problems("finetune.init_from=models:/tiny@champion")
    message = _problems("finetune.init_from=models:/tiny/3", "pretrain.enabled=false", "tokenizer.file=t.json")
    assert "tokenizer.file" in message and "leave tokenizer.file unset" in message
    cfg = load_config(None, ["finetune.init_from=models:/tiny/3", "pretrain.enabled=false"])
    assert registry_ref(cfg.finetune.init_from) == ("tiny", None, "3")
    assert registry_ref("models:/tiny@champion") == ("tiny", "champion", None)


# ----------------------------------------------------------------------------- lineage and cache key


def test_lineage_tags_name_the_base_and_only_they_reach_the_version():
    base = init_from.Base("registry", "/s/bases/registry-ab", "ab" * 32, source="models:/tiny/3",
                          sha256="ab" * 32, run_id="r123", version="3")
    tags = base.tags()
    assert tags == {"finetune.base": "models:/tiny/3", "finetune.base_kind": "registry",
                    "finetune.base_sha256": "ab" * 32, "finetune.base_run_id": "r123", "finetune.base_version": "3"}
    assert init_from.lineage_tags({**tags, "data.fingerprint": "x", "mlflow.runName": "p"}) == tags
    pretrained = init_from.pretrained("run9", "/s/runs/p/pretrain/ckpt", "key9")
    assert pretrained.tags() == {"finetune.base": "runs:/run9", "finetune.base_kind": "pretrain",
                                 "finetune.base_run_id": "run9"}
    assert pretrained.key == "key9"  # a run without init_from keys its fine-tune on the pretrain stage, as before


def test_the_finetune_cache_key_follows_the_starting_point():
    def key(init, base_key):
        cfg = load_config(None, [f"finetune.init_from={init}", "pretrain.enabled=false"])
        return stage_cache.stage_key("finetune", cfg, ("data", base_key))

    same = key("models:/tiny@champion", "sha-v1")
    assert key("models:/tiny@champion", "sha-v1") == same
    assert key("models:/tiny@champion", "sha-v2") != same  # the alias moved to a version with other files
    assert key("models:/tiny/1", "sha-v1") != same  # another init_from


# ----------------------------------------------------------------------------- the starting model's folder


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    folder, _, tokenizer = _hf_folder(tmp_path_factory.mktemp("hf") / "gpt2")
    return folder, tokenizer


def test_an_hf_folder_is_converted_once_and_keyed_by_its_content(tmp_path, hf_base):
    src, tokenizer = hf_base
    cfg = load_config(None, [f"finetune.init_from={src}", "pretrain.enabled=false", "data.block_size=16"])
    first = init_from.resolve(cfg, "unused", str(tmp_path / "root"))
    assert first.kind == "hf" and first.uri.startswith(str(tmp_path / "root" / "bases" / "hf-"))
    assert json.loads((Path(first.uri) / "config.json").read_text())["vocab_size"] == tokenizer.get_vocab_size()
    mtime = (Path(first.uri) / "model.safetensors").stat().st_mtime_ns
    again = init_from.resolve(cfg, "unused", str(tmp_path / "root"))
    assert again == first and (Path(first.uri) / "model.safetensors").stat().st_mtime_ns == mtime
    assert init_from.with_base_tokenizer(cfg, first).tokenizer.file == f"{first.uri}/{TOKENIZER_FILE}"

    other, _, _ = _hf_folder(tmp_path / "other", seed=1)  # other weights: another base, another key
    moved = init_from.resolve(dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, init_from=str(other))),
                              "unused", str(tmp_path / "root"))
    assert moved.key != first.key and moved.uri != first.uri


def test_model_keys_that_disagree_with_the_starting_model_are_refused(tmp_path, hf_base):
    src, _ = hf_base
    cfg = load_config(None, [f"finetune.init_from={src}", "pretrain.enabled=false", "model.n_layer=4",
                             "data.block_size=64"])
    with pytest.raises(ConfigError) as info:
        init_from.resolve(cfg, "unused", str(tmp_path))
    assert "model.n_layer=4 differs from the starting model's 2" in str(info.value)
    assert "data.block_size=64 is longer than the starting model's context (32 positions" in str(info.value)


def test_the_data_stage_uses_the_starting_models_tokenizer_and_its_eot_id(tmp_path, hf_base):
    src, tokenizer = hf_base
    eot = tokenizer.token_to_id(EOT)
    assert eot == tokenizer.get_vocab_size() - 1 != 0  # as in GPT-2 (50256)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(30):
        (corpus / f"doc{i}.txt").write_text(sample_text(i))
    out = tmp_path / "data"
    result = data_lib.prepare_data(
        str(out), DataConfig(source=str(corpus), block_size=32, val_fraction=0.2),
        TokenizerConfig(file=str(src / TOKENIZER_FILE)),
        FinetuneConfig(source=_pairs(tmp_path / "pairs.jsonl"), init_from=str(src)))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["eot_id"] == eot and result.vocab_size == tokenizer.get_vocab_size()
    rows = [t for f in sorted((out / "train").iterdir()) for t in pq.read_table(f)["tokens"].to_pylist()]
    assert any(eot in row for row in rows) and not any(0 in row for row in rows)  # documents end with EOT, not id 0
    sft = pq.read_table(out / "sft_train.parquet")
    for tokens, mask in zip(sft["tokens"].to_pylist(), sft["mask"].to_pylist()):
        last = max(i for i, m in enumerate(mask) if m)
        assert tokens[last] == eot and all(t == eot for t in tokens[last:])  # the completion's EOT, then padding


# ----------------------------------------------------------------------------- LoRA counts


def test_lora_counts_per_target_module():
    from components.finetune import LORA_TARGETS, apply_lora, trainable_summary

    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=16))
    total = sum(p.numel() for p in model.parameters())
    assert trainable_summary(model)["finetune.trainable_ratio"] == 1.0
    with torch.device("meta"):
        meta = apply_lora(GPT(model.config), rank=4, alpha=8.0)
    summary = trainable_summary(meta)
    per_target = {"attn.c_attn": 4 * (16 + 48), "attn.c_proj": 4 * (16 + 16), "mlp.c_fc": 4 * (16 + 64),
                  "mlp.c_proj": 4 * (64 + 16)}
    assert {t: summary[f"lora.adapter_params.{t}"] for t in LORA_TARGETS} == {t: 2 * n for t, n in per_target.items()}
    assert summary["finetune.trainable_params"] == 2 * sum(per_target.values())
    assert summary["finetune.total_params"] == total + summary["finetune.trainable_params"]
    assert summary["finetune.trainable_ratio"] == pytest.approx(summary["finetune.trainable_params"] / summary[
        "finetune.total_params"])


# ----------------------------------------------------------------------------- the pipeline


_SMALL = ["data.block_size=32", "data.val_fraction=0.2", "finetune.max_steps=3", "finetune.log_every=1",
          "finetune.eval_every=0", "finetune.batch_size=4", "quantize.variants=[fp32]", "evaluate.max_batches=2",
          "evaluate.num_samples=1", "evaluate.gen_tokens=4", "evaluate.bpb_max_bytes=4096", "pretrain.enabled=false"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, hf_base):
    """Run 1 fine-tunes the Hugging Face folder (no pretraining); run 2 fine-tunes run 1's champion."""
    root = tmp_path_factory.mktemp("pipeline")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"doc{i}.txt").write_text(sample_text(i))
    workdir = root / "work"
    workdir.mkdir()
    common = [*_SMALL, f"workdir={workdir}", f"data.source={corpus}",
              f"finetune.source={_pairs(root / 'pairs.jsonl')}"]
    results = []
    for init in (str(hf_base[0]), "models:/tiny@champion"):
        done = gptforge("run", str(TINY_EXPERIMENT), *common, f"finetune.init_from={init}", cwd=workdir)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
        results.append(done)
    client = MlflowClient(resolve_tracking_uri(str(workdir)))
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    return {"client": client, "runs": runs, "workdir": workdir, "hf": hf_base}


def _stage_runs(two_runs, stage):
    return [r for r in two_runs["runs"] if r.data.tags.get(STAGE_TAG) == stage]


@pytest.mark.slow  # two tiny pipeline runs through the CLI
def test_finetune_from_an_hf_folder_without_pretraining(two_runs):
    client = two_runs["client"]
    assert not _stage_runs(two_runs, "pretrain")  # pretrain.enabled: false ran no pretraining
    data_run = _stage_runs(two_runs, "prepare_data")[0]
    manifest = json.loads(open(client.download_artifacts(data_run.info.run_id, "data/manifest.json")).read())
    tokenizer = two_runs["hf"][1]
    assert manifest["eot_id"] == tokenizer.token_to_id(EOT) and manifest["vocab_size"] == tokenizer.get_vocab_size()
    first = _stage_runs(two_runs, "finetune")[0]
    tags, params = first.data.tags, first.data.params
    assert tags["finetune.base_kind"] == "hf" and tags["finetune.base"] == str(two_runs["hf"][0])
    assert len(tags["finetune.base_sha256"]) == 64 and len(tags["finetune.base_source_sha256"]) == 64
    assert float(params["finetune.trainable_ratio"]) < 1 and int(params["lora.adapter_params.attn.c_attn"]) > 0
    v1 = client.get_model_version("tiny", "1")
    assert v1.tags["finetune.base_kind"] == "hf" and v1.tags["finetune.base_sha256"] == tags["finetune.base_sha256"]


@pytest.mark.slow
def test_finetune_from_the_registry_champion_records_that_version(two_runs):
    client = two_runs["client"]
    v1 = client.get_model_version("tiny", "1")
    second = _stage_runs(two_runs, "finetune")[1]
    tags = second.data.tags
    assert tags["finetune.base"] == "models:/tiny/1" and tags["finetune.base_kind"] == "registry"
    assert tags["finetune.base_version"] == "1" and tags["finetune.base_run_id"] == v1.run_id
    assert tags["finetune.base_sha256"] == v1.tags["checksums.sha256"]
    v2 = client.get_model_version("tiny", "2")
    assert v2.tags["finetune.base"] == "models:/tiny/1" and v2.tags["finetune.base_run_id"] == v1.run_id
