"""Stage cache keys: which finished stage output a new run may reuse instead of recomputing.

A stage's key is a sha256 over
- its code version: the source of the modules that compute it (so editing the
  training loop invalidates pretrain and finetune, editing evaluate.py nothing here),
- its config section (without `cache` itself, which only says whether to look),
- the keys of its inputs, and for prepare_data the fingerprint of the data sources.
Equal keys mean equal inputs, so the output recorded under a key can be reused while
its files are still there and complete. The lookup itself is an MLflow search
(`Tracker.cached_output`); this module only computes keys and checks files.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
from functools import lru_cache
from pathlib import Path

from components import checkpoint as ckpt
from components.artifacts import Checkpoint, TokenizedData
from components.config import ExperimentConfig

CACHED_STAGES = ("prepare_data", "pretrain", "finetune")  # the later stages take seconds: they always run

# The modules whose code decides a stage's output. pipelines.stages and pipelines.ray_runtime wire the
# components (the training loop per worker lives in ray_runtime), so they count too.
_CODE = {
    "prepare_data": ("components.data", "components.artifacts", "pipelines.stages"),
    "pretrain": ("components.train", "components.model", "components.parallel", "components.checkpoint",
                 "components.artifacts", "pipelines.ray_runtime", "pipelines.stages"),
}
_CODE["finetune"] = (*_CODE["pretrain"], "components.finetune")

# The finetune keys that the data stage reads (it also builds the SFT pairs).
_SFT_DATA_KEYS = ("source", "max_bytes", "max_pairs", "heldout_fraction")


def stage_key(stage: str, cfg: ExperimentConfig, inputs: tuple[str, ...] = (), data_fingerprint: str = "") -> str:
    """The cache key of `stage` under `cfg`, given its inputs' keys (and the sources' fingerprint)."""
    payload = {
        "stage": stage,
        "code": code_version(stage),
        "config": stage_config(stage, cfg),
        "inputs": list(inputs),
        "data": data_fingerprint,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def stage_config(stage: str, cfg: ExperimentConfig) -> dict:
    """The part of the experiment that `stage` reads."""
    def section(obj) -> dict:
        values = dataclasses.asdict(obj)
        values.pop("cache", None)
        return values

    if stage == "prepare_data":
        return {"data": section(cfg.data), "tokenizer": section(cfg.tokenizer),
                "finetune": {k: getattr(cfg.finetune, k) for k in _SFT_DATA_KEYS}}
    if stage == "pretrain":
        return {"pretrain": section(cfg.pretrain), "model": section(cfg.model)}
    if stage == "finetune":
        return {"finetune": section(cfg.finetune)}
    raise ValueError(f"no cache key for stage {stage!r}")  # a bug: only CACHED_STAGES have keys


def cache_enabled(stage: str, cfg: ExperimentConfig) -> bool:
    """The per-stage `cache:` switch of the experiment file (data.cache for prepare_data)."""
    return {"prepare_data": cfg.data, "pretrain": cfg.pretrain, "finetune": cfg.finetune}[stage].cache


@lru_cache(maxsize=None)
def code_version(stage: str) -> str:
    """sha256 over the source files of the modules that compute `stage`."""
    h = hashlib.sha256()
    for name in _CODE[stage]:
        spec = importlib.util.find_spec(name)
        h.update(name.encode() + b"\0" + Path(spec.origin).read_bytes() + b"\0")
    return h.hexdigest()


def output_complete(record) -> bool:
    """Whether every file a recorded stage output points at is still there, whole."""
    if isinstance(record, TokenizedData):
        # manifest.json is written last (components/data.py), so it marks a complete folder.
        paths = [record.manifest_uri, record.train_uri, record.val_uri, record.sft_train_uri,
                 record.sft_heldout_uri, record.tokenizer_uri]
        return all(Path(p).is_file() for p in paths)
    if isinstance(record, Checkpoint):
        return ckpt.step_of(record.uri) is not None  # its checkpoint.json lists every file with its size
    return False
