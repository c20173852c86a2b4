"""The model fine-tuning starts from, resolved on the driver before the data stage runs.

`finetune.init_from` (components/config.py) is resolved once per pipeline run into a `Base`:
a gptforge model folder below the storage root (components/base_model.py says where and why),
with its identity. That identity is the base's lineage, logged as `finetune.base*` tags on the
pipeline and fine-tune runs and carried to the registered model version (pipelines/promotion.py),
and it is the fine-tune stage's cache input in place of the pretrain stage's key, so a different
starting point, or an alias that moved to another version, never reuses a cached fine-tune.

A registry reference is downloaded and checked against the sha256 the registry pinned on the
version, as serving and `gptforge export-hf` do (pipelines/model_loading.py).
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, replace

from components import base_model, storage
from components import model as gpt
from components.artifacts import Checkpoint
from components.experiment_file import ConfigError, ExperimentConfig
from components.files import IntegrityError
from components.tokenizer import TOKENIZER_FILE
from pipelines import registry
from pipelines.tracking import redact

LINEAGE_PREFIX = "finetune.base"  # every lineage tag starts with it: what promotion copies onto the version
KINDS = ("pretrain", "folder", "hf", "registry")
REGISTRY = base_model.REGISTRY_PREFIX


@dataclass(frozen=True)
class Base:
    """The model fine-tuning starts from, and who it is."""

    kind: str
    """One of KINDS: the pretrain stage's output, a gptforge folder, a converted Hugging Face folder, a
    registry version."""
    uri: str
    """The gptforge model folder (path or storage URI) fine-tuning loads."""
    key: str
    """The fine-tune stage's cache input: the pretrain stage's key, or the sha256 of the base's files."""
    source: str = ""
    """What it came from: `models:/NAME/VERSION`, the folder given, or `runs:/RUN_ID` of the pretrain stage."""
    sha256: str = ""
    """sha256 of the base folder's checksums.json (for a registry version: the pin it was checked against)."""
    source_sha256: str = ""
    """For a folder: sha256 over the files of the folder given (for Hugging Face, before conversion)."""
    run_id: str = ""
    """The MLflow run that produced it (the pretrain run, or the registry version's run)."""
    version: str = ""
    """The registry version."""

    def checkpoint(self) -> Checkpoint:
        """The base as the record the fine-tune stage starts from."""
        return Checkpoint(uri=self.uri, step=0)

    def tags(self) -> dict[str, str]:
        """The lineage tags (`finetune.base`, `finetune.base_kind`, ...); empty values left out."""
        values = {"": self.source or self.uri, "_kind": self.kind, "_sha256": self.sha256,
                  "_source_sha256": self.source_sha256, "_run_id": self.run_id, "_version": self.version}
        return {f"{LINEAGE_PREFIX}{k}": redact(v) for k, v in values.items() if v}


def lineage_tags(tags: dict) -> dict:
    """The `finetune.base*` tags among a run's `tags` (what a registered version carries)."""
    return {k: v for k, v in tags.items() if k.startswith(LINEAGE_PREFIX)}


def pretrained(run_id: str, uri: str, pretrain_key: str) -> Base:
    """The pretrain stage's output as the base (`init_from` unset)."""
    return Base("pretrain", uri, pretrain_key, source=f"runs:/{run_id}" if run_id else uri, run_id=run_id)


def resolve(cfg: ExperimentConfig, tracking_uri: str, root: str) -> Base | None:
    """The starting model `finetune.init_from` names, kept under `root`; None when it is unset.

    Raises:
        ConfigError: the model disagrees with the experiment (`base_model.model_problems`).
        ConversionError: a folder that is neither a gptforge nor a Hugging Face GPT-2 one, or a quantized model.
        LookupError, TrackingError, IntegrityError: a registry reference that cannot be found or verified.
    """
    init_from = cfg.finetune.init_from
    if not init_from:
        return None
    ref = base_model.registry_ref(init_from)
    if ref is not None:
        base = _from_registry(tracking_uri, *ref, root)
    elif base_model.is_hf_folder(init_from):
        source_sha = base_model.folder_sha256(init_from)
        target = base_model.base_folder(root, "hf", source_sha)
        pin = base_model.ready_pin(target) or base_model.import_hf_folder(init_from, target, cfg.model.pad_vocab_to)
        base = Base("hf", target, pin, source=init_from, sha256=pin, source_sha256=source_sha)
    else:
        source_sha = base_model.folder_sha256(init_from, base_model.BASE_FILES)
        target = base_model.base_folder(root, "folder", source_sha)
        pin = base_model.ready_pin(target) or base_model.copy_model_folder(init_from, target)
        base = Base("folder", target, pin, source=init_from, sha256=pin, source_sha256=source_sha)
    problems = base_model.model_problems(cfg, gpt.read_config(base.uri), redact(base.source))
    if problems:
        raise ConfigError("finetune.init_from: the experiment does not fit the starting model:\n"
                          + "\n".join(f"  - {p}" for p in problems))
    return base


def model_config(base: Base | None) -> gpt.GPTConfig | None:
    """The starting model's shape (what `model.*` gives way to), None without a starting model."""
    return gpt.read_config(base.uri) if base is not None else None


def with_base_tokenizer(cfg: ExperimentConfig, base: Base | None) -> ExperimentConfig:
    """`cfg` as the data stage runs it: with a starting model, its tokenizer (never a new one).

    `tokenizer.vocab_size` and `tokenizer.sample_bytes` are then unused (the config refuses a
    `tokenizer.file` beside `finetune.init_from`).
    """
    if base is None or base.kind == "pretrain":
        return cfg
    return replace(cfg, tokenizer=replace(cfg.tokenizer, file=storage.join(base.uri, TOKENIZER_FILE)))


def _from_registry(tracking_uri: str, name: str, alias: str | None, number: str | None, root: str) -> Base:
    """Download the version (once per pin) below `root`, checked against the registry's sha256."""
    version = (registry.find_alias(tracking_uri, name, alias) if alias
               else registry.model_version(tracking_uri, name, number))
    label = f"{name}:v{version.version}"
    pin = version.tags.get(registry.CHECKSUMS_TAG)
    if not pin:
        raise IntegrityError(f"finetune.init_from: {label} has no {registry.CHECKSUMS_TAG} tag in the registry at "
                             f"{redact(tracking_uri)}, so its files cannot be verified; refusing to start from it")
    target = base_model.base_folder(root, "registry", pin)
    if base_model.ready_pin(target, pin) is None:
        with tempfile.TemporaryDirectory(prefix="gptforge-base-") as tmp:
            folder = registry.download_version(tracking_uri, version, tmp)
            base_model.check_float_model(folder, f"{REGISTRY}{name}/{version.version}")
            base_model.verify_folder(folder, pin)
            storage.delete_folder(target)  # a damaged earlier copy: no file of it may stay
            storage.upload_folder(folder, target)
        if base_model.ready_pin(target, pin) is None:
            raise IntegrityError(f"finetune.init_from: the copy of {label} at {redact(target)} does not match the "
                                 f"registry's {registry.CHECKSUMS_TAG}")
    return Base("registry", target, pin, source=f"{REGISTRY}{name}/{version.version}", sha256=pin,
                run_id=version.run_id or "", version=str(version.version))

