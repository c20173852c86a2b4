"""The experiment file: its top level, the checks across its sections, reading it and writing it back.

An experiment YAML has one section per stage (the dataclasses of components/config.py, each
field with its own rules); every key has a default, so any section (or the whole file) may be
left out. Overrides use the same dotted names as the file (`pretrain.max_steps=50`). Unknown
keys and values of the wrong type are errors that name the key, and every problem is reported
at once: while a mapping read from YAML becomes the typed dataclasses, each problem is appended
to an `errors` list, starting with its dotted key.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from components.config import (TENSOR_PARALLEL, DataConfig, EvaluateConfig, FinetuneConfig, ModelConfig,
                               PretrainConfig, PromoteConfig, QuantizeConfig, ServeConfig, TokenizerConfig,
                               TrainingConfig)
from components.field_rules import check_fields, checked, digits, positive, reported_by, required_text
from components.strict_yaml import parse_document, parse_override

class ConfigError(ValueError):
    """The experiment file or an override is wrong; the message names every bad key."""


def _registered_model_name(value: str) -> str | None:
    # A name MLflow takes for a registered model (no '/' or ':') that is also a safe folder name (serving cache).
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", value):
        return (f"{value!r} cannot name an MLflow registered model; use up to 100 letters, digits, "
                f"'.', '_' or '-', starting with a letter or digit")
    return None


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole experiment file: its top-level keys and one field per section."""

    name: str = checked("tiny", reported_by(_registered_model_name))
    """MLflow experiment name and registered model name."""
    workdir: str = checked(".gptforge", required_text)
    """Local folder of the driver: the MLflow SQLite store and its artifacts (when no
    MLFLOW_TRACKING_URI is set), and the stage outputs unless `storage` says otherwise."""
    storage: str = ""
    """Where every stage writes its outputs (data shards, checkpoints, candidates): a local
    folder, a shared mount, or a URI that pyarrow.fs opens (`s3://bucket/prefix`, `gs://...`).
    Empty: the workdir. A Ray cluster of more than one node needs storage every node reaches."""
    ray_num_cpus: int = checked(4, positive)
    """Logical CPUs of the embedded local Ray, more than the cores: Ray Data needs a free logical CPU
    to read while the training workers hold one each, and with num_cpus equal to the cores a lazy
    read would wait forever (docs/ray-and-mlflow.md)."""
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    promote: PromoteConfig = field(default_factory=PromoteConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)


# ----------------------------------------------------------------------------- loading and checking

def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read an experiment YAML (or only defaults when `path` is None) and apply overrides.

    Args:
        path: the experiment file.
        overrides: `section.key=value` strings; values are parsed as YAML scalars/lists
            (strict_yaml.parse_override: a `#` in a value is kept).

    Raises:
        ConfigError: listing every unknown key, wrong type and bad value, each by name.
    """
    raw: dict = {}
    where = "defaults"
    errors: list[str] = []
    if path is not None:
        where = str(path)
        raw, repeated = _read_experiment(Path(path))
        errors.extend(repeated)
    for item in overrides:
        _apply_override(raw, item, errors)
    cfg = _build(ExperimentConfig, raw, "", errors)
    if cfg is not None:
        errors.extend(check_fields(cfg))
        errors.extend(_cross_checks(cfg))
    if errors:
        raise ConfigError(f"invalid experiment ({where}):\n" + "\n".join(f"  - {e}" for e in errors))
    return cfg


_MAX_FILE_BYTES = 1 << 20  # an experiment is a few KB; more is the wrong file (or /dev/zero)


def _read_experiment(path: Path) -> tuple[dict, list[str]]:
    """The mapping in the experiment file `path`, and the keys it gives twice.

    Raises:
        ConfigError: the file cannot be read, is not UTF-8, not YAML, or not a mapping.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"experiment file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not an experiment file; name a YAML file such as "
                          f"experiments/tiny.yaml") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the experiment file: {error.strerror or error}") from None
    if len(data) > _MAX_FILE_BYTES:
        raise ConfigError(f"{path}: larger than {_MAX_FILE_BYTES >> 20} MiB, so not an experiment file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte 0x{data[error.start]:02x}); "
                          f"save the experiment file as UTF-8") from None
    try:
        raw, repeated = parse_document(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML: nested too deeply") from None
    except ValueError as error:  # Python refuses integers of more than 4300 digits
        raise ConfigError(f"{path}: a value cannot be read: {str(error).split(';')[0]}") from None
    if raw is None:
        return {}, repeated
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return raw, repeated


def _cross_checks(cfg: ExperimentConfig) -> list[str]:
    """The checks that read two fields or two sections, before Ray starts. Each skips operands
    that their own field's rule already refused."""
    errors = []
    shape = cfg.model.shape()
    if shape is not None and shape["n_embd"] % shape["n_head"]:
        errors.append(f"model.n_head: {shape['n_head']} heads do not divide n_embd {shape['n_embd']} "
                      f"(preset {cfg.model.preset!r} plus overrides); pick n_head dividing n_embd")
    for section in ("pretrain", "finetune"):
        t: TrainingConfig = getattr(cfg, section)
        if math.isfinite(t.lr) and math.isfinite(t.min_lr) and t.min_lr > t.lr:
            errors.append(f"{section}.min_lr: must not exceed {section}.lr ({t.lr}), got {t.min_lr}")
        micro_tokens = t.micro_step_tokens(cfg.data.block_size)
        if t.tokens_per_step > 0 and micro_tokens > 0 and t.tokens_per_step % micro_tokens:
            errors.append(
                f"{section}.tokens_per_step: {t.tokens_per_step} is not a multiple of one micro-step's tokens "
                f"({t.data_parallel_workers()} data-parallel workers x {section}.batch_size {t.batch_size} x "
                f"data.block_size {cfg.data.block_size} = {micro_tokens})")
        if t.strategy != "ddp" and t.precision == "fp16":
            errors.append(f"{section}.precision: fp16 is not supported with strategy {t.strategy} (its gradient "
                          f"scaling is not wired for sharded gradients); use bf16")
        if t.tp_degree <= 0:
            continue
        if t.strategy not in TENSOR_PARALLEL:
            if t.tp_degree != 1:
                errors.append(f"{section}.tp_degree: {t.tp_degree} only applies to strategy tp or fsdp+tp "
                              f"({section}.strategy is {t.strategy!r}); set it to 1 or change the strategy")
            continue
        if t.tp_degree > t.num_workers:
            errors.append(f"{section}.tp_degree: {t.tp_degree} tensor-parallel workers are more than "
                          f"{section}.num_workers ({t.num_workers})")
        elif t.num_workers % t.tp_degree:
            errors.append(f"{section}.tp_degree: {t.tp_degree} does not divide {section}.num_workers "
                          f"({t.num_workers}); the workers form groups of tp_degree")
        if shape is not None and shape["n_head"] % t.tp_degree:
            errors.append(f"{section}.tp_degree: {t.tp_degree} does not divide the model's {shape['n_head']} "
                          f"attention heads (model.n_head); each worker computes whole heads")
        if shape is not None and shape["n_embd"] % t.tp_degree:
            errors.append(f"{section}.tp_degree: {t.tp_degree} does not divide the model's hidden size "
                          f"{shape['n_embd']} (model.n_embd)")
        if section == "finetune" and cfg.finetune.uses_lora:
            errors.append("finetune.strategy: tp and fsdp+tp do not support finetune.method lora yet (the adapters "
                          "wrap the Linears that tensor parallelism splits); use method full, or strategy ddp or fsdp")
    from components.base_model import config_problems  # finetune.init_from, pretrain.enabled, tokenizer.file

    errors.extend(config_problems(cfg))
    s = cfg.serve
    if s.max_replicas and s.max_replicas < s.num_replicas:
        errors.append(f"serve.max_replicas: {s.max_replicas} is below serve.num_replicas "
                      f"({s.num_replicas}); set it to 0 for a fixed number of replicas")
    if s.max_choices > s.max_batch_size:
        errors.append(f"serve.max_choices: {s.max_choices} is more than serve.max_batch_size "
                      f"({s.max_batch_size}), so such a request could never run; lower it")
    if s.max_choices > s.max_queued_rows:
        errors.append(f"serve.max_choices: {s.max_choices} is more than serve.max_queued_rows "
                      f"({s.max_queued_rows}), so such a request could never be queued; lower it")
    return errors


# ----------------------------------------------------------------------------- reading a config back

def flatten(cfg) -> dict[str, object]:
    """The config as `{"pretrain.max_steps": 200, ...}`: the names MLflow params are logged under."""
    out: dict[str, object] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out.update({f"{f.name}.{k}": v for k, v in flatten(value).items()})
        else:
            out[f.name] = value
    return out


def to_yaml(cfg: ExperimentConfig) -> str:
    """The resolved experiment as YAML; loading it back gives the same config."""
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)


def config_hash(section) -> str:
    """Short stable hash of a config (or one section), for lineage tags."""
    payload = json.dumps(dataclasses.asdict(section), sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- from YAML to the dataclasses

def _apply_override(raw: dict, item: str, errors: list[str]) -> None:
    """Set `section.key=value` (the value parsed as a YAML scalar or list) in the mapping read from the file."""
    key, sep, value = item.partition("=")
    if not item.isascii() and not _is_utf8(item):
        errors.append(f"override {item!r}: not UTF-8 text")
        return
    if not sep or not key:
        errors.append(f"override {item!r}: expected key=value, for example pretrain.max_steps=50")
        return
    node = raw
    *parents, leaf = key.strip().split(".")
    for part in parents:
        if node.get(part) is None:  # absent, or left empty in the YAML (`data:`): the override fills it
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            errors.append(f"override {item!r}: {part} is not a section")
            return
    node[leaf], repeated = parse_override(value)
    errors.extend(f"override {item!r}: {problem}" for problem in repeated)


def _is_utf8(text: str) -> bool:
    """False for a command-line argument whose bytes were not UTF-8 (Python keeps them as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _build(cls, raw, prefix: str, errors: list[str]):
    """An instance of the dataclass `cls` from `raw`, its fields' defaults filling what `raw` leaves out.

    Unknown keys and values of the wrong type go to `errors` (named `prefix` + key); the instance
    is built from the rest, so the caller can still check its values. None when `raw` is no mapping.
    """
    if not isinstance(raw, dict):
        errors.append(f"{prefix.rstrip('.') or 'experiment'}: expected a mapping, got {_shown(raw)}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            known = ", ".join(fields)
            errors.append(f"{prefix}{key}: unknown key (known keys here: {known})")
    kwargs = {}
    for name in fields:
        if name not in raw:
            continue
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            built = _build(hint, raw[name] if raw[name] is not None else {}, f"{prefix}{name}.", errors)
            if built is not None:
                kwargs[name] = built
            continue
        value, problem = _coerce(raw[name], hint)
        if problem:
            errors.append(f"{prefix}{name}: {problem}")
        else:
            kwargs[name] = value
    return cls(**kwargs)


def _coerce(value, hint):
    """Return (value, None) when `value` fits the annotation `hint`, else (None, problem)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None, None
        for option in options:
            if option is type(None):
                continue
            coerced, problem = _coerce(value, option)
            if problem is None:
                return coerced, None
        return None, f"expected {_type_name(hint)}, got {_shown(value)}"
    if origin is list:
        (item_type,) = typing.get_args(hint)
        if not isinstance(value, list):
            return None, f"expected a list of {item_type.__name__}, got {_shown(value)}"
        out = []
        for v in value:
            coerced, problem = _coerce(v, item_type)
            if problem:
                return None, f"list item {_shown(v)}: {problem}"
            out.append(coerced)
        return out, None
    # bool is a subclass of int: refuse `max_steps: true` and `use_gpu: 1` alike.
    if hint is bool:
        return (value, None) if isinstance(value, bool) else (None, f"expected true or false, got {_shown(value)}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value, None
        return None, f"expected an integer, got {_shown(value)}"
    if hint is float:
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):  # YAML reads `3e-4` as a string
            try:
                return float(value), None
            except OverflowError:  # an integer of 309 digits or more
                return None, f"{_shown(value)} is too large for a number"
            except ValueError:
                pass
        return None, f"expected a number, got {_shown(value)}"
    if hint is str:
        return (value, None) if isinstance(value, str) else (None, f"expected a string, got {_shown(value)}")
    raise TypeError(f"unsupported config annotation {hint!r}")  # a bug in a config dataclass, not user input


def _shown(value, limit: int = 60) -> str:
    """`value` as a message shows it: its repr, cut short; a huge integer by its number of digits."""
    if isinstance(value, int) and value.bit_length() > 200:
        return f"an integer of {digits(value)} digits"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 5]}...{text[-2:]}"


def _type_name(hint) -> str:
    return " or ".join("null" if a is type(None) else a.__name__ for a in typing.get_args(hint))
