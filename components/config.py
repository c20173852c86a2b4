"""The experiment file: one frozen dataclass per stage, YAML load, dotted overrides.

An experiment YAML has one section per stage; every key has a default, so any
section (or the whole file) may be left out. Overrides use the same dotted names
as the file (`pretrain.max_steps=50`). Unknown keys and values of the wrong type
are errors that name the key, and every problem is reported at once.
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

from components.metrics import CANDIDATE_METRICS
from components.sampling import seed_problem, temperature_problem


class ConfigError(ValueError):
    """The experiment file or an override is wrong; the message names every bad key."""


@dataclass(frozen=True)
class DataConfig:
    source: str = "stdlib"
    """`stdlib` (the Python standard library's own sources), a folder of .txt/.md/.py files,
    a .jsonl file with a text field, or a .parquet file with a text column."""
    text_field: str = "text"
    """Field (jsonl) or column (parquet) holding the document text."""
    max_bytes: int = 0
    """Use a deterministic subset of about this many bytes of the corpus; 0 uses all of it."""
    block_size: int = 128
    """Tokens per training sequence (the model's context length)."""
    val_fraction: float = 0.05
    """Share of documents held out for validation, chosen by a hash of the document id."""
    cache: bool = True
    """Reuse the prepared data of an earlier run with the same sources, data settings and code
    (the stage cache); false always prepares it again."""


@dataclass(frozen=True)
class TokenizerConfig:
    vocab_size: int = 4096
    """Size of the byte-level BPE vocabulary trained on the corpus."""


@dataclass(frozen=True)
class ModelConfig:
    preset: str = "tiny"
    """One of components.model.PRESETS: tiny, mini, gpt2, gpt2-medium, gpt2-large, gpt2-xl."""
    n_layer: int | None = None
    """Overrides the preset's number of transformer blocks."""
    n_head: int | None = None
    """Overrides the preset's number of attention heads."""
    n_embd: int | None = None
    """Overrides the preset's embedding width."""
    dropout: float = 0.0
    """Dropout probability in attention and MLP (0 for short runs)."""
    bias: bool = True
    """Biases in Linear and LayerNorm layers, as in GPT-2; false is a little faster and no worse."""
    pad_vocab_to: int = 1
    """Round the embedding's vocabulary up to a multiple of this (64 suits GPU matmuls; 1 = no padding).
    The extra rows are never a target, so they only cost memory."""


@dataclass(frozen=True)
class TrainingConfig:
    """What pretraining and fine-tuning share: workers and the optimisation schedule."""

    num_workers: int = 2
    """Ray Train workers (processes); each gets one CPU or one GPU."""
    use_gpu: bool = False
    """Train on GPUs (nccl) instead of CPUs (gloo)."""
    max_steps: int = 200
    """Optimizer steps."""
    batch_size: int = 16
    """Sequences per worker per step."""
    lr: float = 1e-3
    """Peak learning rate (AdamW), reached after warmup, then cosine decay to min_lr."""
    min_lr: float = 1e-4
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 20
    """Linear warmup steps."""
    weight_decay: float = 0.1
    """AdamW weight decay on 2-D weights."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""
    log_every: int = 1
    """Log training metrics to MLflow every this many steps. Reading the loss syncs the GPU, so
    on a GPU log every 10 or more steps."""
    seed: int = 1337
    """Seed for weights, adapters and data order."""
    strategy: str = "ddp"
    """How the workers share the model: `ddp` (every worker holds all of it), `fsdp`
    (PyTorch FSDP2 `fully_shard`: parameters, gradients and optimizer state sharded over workers),
    `tp` (tensor parallel: each block's weight matrices split over groups of `tp_degree` workers,
    which see the same rows) or `fsdp+tp` (tensor parallel inside each group, FSDP2 across groups)."""
    tp_degree: int = 1
    """Workers per tensor-parallel group (strategies tp and fsdp+tp); must divide num_workers and
    the model's n_head. Put a group on one node: it talks at every layer."""
    precision: str = "auto"
    """`bf16` (autocast), `fp16` (autocast + gradient scaling), `fp32`, or `auto`: bf16 on a GPU,
    fp32 on a CPU. Weights stay fp32; checkpoints are fp32."""
    compile: bool = False
    """torch.compile the model (much faster on a GPU; the first steps compile, 15 s or more)."""
    tokens_per_step: int = 0
    """Tokens per optimizer step over all workers. More than one micro-batch per worker
    (num_workers x batch_size x block_size) accumulates gradients; 0 means one micro-batch."""
    eval_every: int = 100
    """Measure the validation loss (`val/loss`) every this many steps and at the end; 0 never."""
    eval_batches: int = 4
    """Batches per worker for each validation loss."""
    checkpoint_every: int = 100
    """Save model, optimizer, step, RNG state and data position every this many steps (and at the end).
    A worker that dies loses at most this many steps."""
    keep_checkpoints: int = 2
    """Checkpoints kept in Ray Train's storage (the newest ones)."""
    max_failures: int = 1
    """Times Ray Train restarts the workers after one dies, continuing from the last checkpoint."""
    cpus_per_worker: float = 1.0
    """CPUs Ray reserves for each training worker."""
    gpus_per_worker: float = 1.0
    """GPUs Ray reserves for each training worker when use_gpu is true."""
    cache: bool = True
    """Reuse the checkpoint of an earlier run whose stage key (code, this section, its inputs) is the
    same (the stage cache); false always trains again."""


@dataclass(frozen=True)
class PretrainConfig(TrainingConfig):
    pass


@dataclass(frozen=True)
class FinetuneConfig(TrainingConfig):
    # Fine-tuning defaults differ from pretraining's: fewer steps on one worker, no decay.
    num_workers: int = 1
    max_steps: int = 100
    warmup_steps: int = 10
    weight_decay: float = 0.0
    eval_every: int = 50
    checkpoint_every: int = 50

    source: str = "stdlib"
    """Prompt/completion pairs: `stdlib` (function signature+docstring -> body, via ast),
    a folder of .py files, or a .jsonl with `prompt` and `completion` fields."""
    max_bytes: int = 0
    """Read about this many bytes of `source` to find pairs; 0 reads all of it."""
    max_pairs: int = 0
    """Keep at most this many pairs (deterministic subset); 0 keeps all."""
    heldout_fraction: float = 0.1
    """Share of pairs held out to measure completion loss."""
    method: str = "lora"
    """`lora` (low-rank adapters, merged back after training) or `full`."""
    lora_rank: int = 8
    """Rank of the LoRA adapters."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator (the update is scaled by alpha / rank)."""


@dataclass(frozen=True)
class QuantizeConfig:
    variants: list[str] = field(default_factory=lambda: ["fp32", "int8_dynamic"])
    """Candidates to build from the fine-tuned model: fp32, bf16, fp16, int8_dynamic (CPU),
    int8_weight_only, int4_weight_only (CUDA). A variant that cannot run here is skipped,
    with the reason on its run. fp32, when listed, is the reference for the deltas."""


@dataclass(frozen=True)
class EvaluateConfig:
    max_batches: int = 20
    """Validation batches per candidate for perplexity (0 = the whole split)."""
    batch_size: int = 16
    """Sequences per evaluation batch."""
    gen_tokens: int = 32
    """Tokens generated per sample and per fixed prompt, also used to measure generation speed."""
    num_samples: int = 3
    """Generated samples logged per candidate (prompts from the held-out pairs)."""
    temperature: float = 0.0
    """Sampling temperature for the samples; 0 is greedy, so runs are comparable."""
    device: str = "auto"
    """`auto` (each candidate on the GPU when there is one and its variant runs there, else
    the CPU), `cpu`, or `cuda` (variants that cannot run there are skipped)."""
    cpu_threads: int = 1
    """torch threads for a candidate evaluated on the CPU; the same for all, so speeds compare."""
    prompts: list[str] = field(default_factory=lambda: [
        "def fibonacci(n):\n", "import os\n", "class Stack:\n    def __init__(self):\n", "for i in range(10):\n",
    ])
    """Fixed prompts whose greedy continuations are logged side by side across candidates."""


@dataclass(frozen=True)
class PromoteConfig:
    metric: str = "eval/val_ppl"
    """Metric that decides the best candidate (one of components.evaluate.CANDIDATE_METRICS)."""
    mode: str = "min"
    """`min` or `max`: which direction of `metric` is better."""
    tie_tolerance: float = 0.01
    """Candidates within this relative distance of the best count as tied."""
    tie_breaker: str = "model/size_bytes"
    """Among tied candidates the one with the best value of this metric wins. The defaults
    read "the smallest candidate whose val perplexity is within 1% of the best"; with
    tie_breaker eval/tokens_per_s, tie_breaker_mode max and tie_tolerance 0.02, "the
    fastest within 2%"."""
    tie_breaker_mode: str = "min"
    """`min` or `max`: which direction of `tie_breaker` wins."""


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    """Address the Serve HTTP proxy binds to."""
    port: int = 8000
    """Port of the Serve HTTP proxy."""
    max_prompt_chars: int = 4000
    """Longest prompt accepted, in characters; longer ones get a 400 naming `prompt`."""
    max_tokens_cap: int = 256
    """Largest `max_tokens` a request may ask for."""
    max_body_bytes: int = 65536
    """Largest request body; a larger one gets 413 before it is read to the end."""
    max_choices: int = 16
    """Most completions one request may ask for (prompts x `n`)."""
    num_cpus: float = 0.5
    """CPUs reserved by each replica (kept small so training jobs still fit)."""
    num_gpus: float = 0.0
    """GPUs reserved by each replica; 1 gives one replica per GPU, and the replica then runs on CUDA."""
    num_replicas: int = 1
    """Replicas started; with `max_replicas` above it, the lower bound of autoscaling."""
    max_replicas: int = 0
    """Upper bound of Serve's autoscaling; 0 (or `num_replicas`) keeps a fixed number of replicas."""
    target_ongoing_requests: float = 16.0
    """Autoscaling target: requests in flight per replica."""
    max_batch_size: int = 16
    """Most completions decoded together in one batch (one forward pass per token); 1 turns batching off."""
    batch_wait_timeout_s: float = 0.01
    """How long the first queued request waits for others to share its batch."""
    max_queued_rows: int = 64
    """Completions that may wait in a replica's queue; past it a request gets 503 with Retry-After at once."""
    max_ongoing_requests: int = 128
    """Serve's cap on requests in flight per replica (streams included); above `max_queued_rows`
    so that a full queue answers 503 itself, quickly, rather than Serve holding requests."""
    max_queued_requests: int = 128
    """Serve's cap on requests waiting for a replica; past it Serve answers 503."""
    poll_interval_s: float = 5.0
    """How often a replica checks the registry alias it serves; when it moved, the replica loads the
    new version and switches to it without dropping a request. 0 turns it off."""


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "tiny"
    """MLflow experiment name and registered model name."""
    workdir: str = ".gptforge"
    """Local folder for the MLflow SQLite store, artifacts and Ray Train storage."""
    ray_num_cpus: int = 4
    """Logical CPUs of the embedded local Ray. More than the cores, so Ray Data still
    gets a slot while two training workers hold one each (see NOTES.md)."""
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    promote: PromoteConfig = field(default_factory=PromoteConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)


# Training strategies (components/parallel.py builds them); the last two split layers over a tp group.
STRATEGIES = ("ddp", "fsdp", "tp", "fsdp+tp")
TENSOR_PARALLEL = ("tp", "fsdp+tp")

# Values that are checked beyond their type: key -> allowed values.
_CHOICES = {
    "pretrain.strategy": STRATEGIES,
    "finetune.strategy": STRATEGIES,
    "pretrain.precision": ("auto", "bf16", "fp16", "fp32"),
    "finetune.precision": ("auto", "bf16", "fp16", "fp32"),
    "finetune.method": ("lora", "full"),
    "promote.mode": ("min", "max"),
}
_QUANT_VARIANTS = ("fp32", "bf16", "fp16", "int8_dynamic", "int8_weight_only", "int4_weight_only")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read an experiment YAML (or only defaults when `path` is None) and apply overrides.

    Args:
        path: the experiment file.
        overrides: `section.key=value` strings; values are parsed as YAML scalars/lists.

    Raises:
        ConfigError: listing every unknown key, wrong type and bad value, each by name.
    """
    raw: dict = {}
    where = "defaults"
    if path is not None:
        where = str(path)
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            raise ConfigError(f"experiment file not found: {path}") from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    errors: list[str] = []
    for item in overrides:
        _apply_override(raw, item, errors)
    cfg = _build(ExperimentConfig, raw, "", errors)
    if cfg is not None:
        errors.extend(_validate(cfg))
    if errors:
        raise ConfigError(f"invalid experiment ({where}):\n" + "\n".join(f"  - {e}" for e in errors))
    return cfg


def _apply_override(raw: dict, item: str, errors: list[str]) -> None:
    key, sep, value = item.partition("=")
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
    try:
        node[leaf] = yaml.safe_load(value)
    except yaml.YAMLError:
        node[leaf] = value


def _build(cls, raw, prefix: str, errors: list[str]):
    if not isinstance(raw, dict):
        errors.append(f"{prefix.rstrip('.') or 'experiment'}: expected a mapping, got {raw!r}")
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
        return None, f"expected {_type_name(hint)}, got {value!r}"
    if origin is list:
        (item_type,) = typing.get_args(hint)
        if not isinstance(value, list):
            return None, f"expected a list of {item_type.__name__}, got {value!r}"
        out = []
        for v in value:
            coerced, problem = _coerce(v, item_type)
            if problem:
                return None, f"list item {v!r}: {problem}"
            out.append(coerced)
        return out, None
    # bool is a subclass of int: refuse `max_steps: true` and `use_gpu: 1` alike.
    if hint is bool:
        return (value, None) if isinstance(value, bool) else (None, f"expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value, None
        return None, f"expected an integer, got {value!r}"
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value), None
        if isinstance(value, str):  # YAML reads `3e-4` (no dot) as a string
            try:
                return float(value), None
            except ValueError:
                pass
        return None, f"expected a number, got {value!r}"
    if hint is str:
        return (value, None) if isinstance(value, str) else (None, f"expected a string, got {value!r}")
    raise TypeError(f"unsupported config annotation {hint!r}")  # a bug in this module, not user input


def _type_name(hint) -> str:
    return " or ".join("null" if a is type(None) else a.__name__ for a in typing.get_args(hint))


def _validate(cfg: ExperimentConfig) -> list[str]:
    errors = []
    for key, allowed in _CHOICES.items():
        value = get_dotted(cfg, key)
        if value not in allowed:
            errors.append(f"{key}: {value!r} is not one of {', '.join(allowed)}")
    positive = [
        "data.block_size", "tokenizer.vocab_size", "pretrain.num_workers", "pretrain.max_steps",
        "pretrain.batch_size", "pretrain.log_every", "finetune.num_workers", "finetune.max_steps",
        "finetune.batch_size", "finetune.log_every", "finetune.lora_rank", "evaluate.batch_size",
        "ray_num_cpus",
    ]
    for key in positive:
        if get_dotted(cfg, key) <= 0:
            errors.append(f"{key}: must be positive, got {get_dotted(cfg, key)}")
    for key in ["data.max_bytes", "finetune.max_bytes", "finetune.max_pairs", "evaluate.max_batches",
                "evaluate.gen_tokens", "evaluate.num_samples", "pretrain.warmup_steps", "finetune.warmup_steps"]:
        if get_dotted(cfg, key) < 0:
            errors.append(f"{key}: must not be negative, got {get_dotted(cfg, key)}")
    for key in ["data.val_fraction", "finetune.heldout_fraction"]:
        if not 0.0 < get_dotted(cfg, key) < 1.0:
            errors.append(f"{key}: must be between 0 and 1 (exclusive), got {get_dotted(cfg, key)}")
    if cfg.tokenizer.vocab_size < 260:
        errors.append(f"tokenizer.vocab_size: must be at least 260 (256 bytes + merges), got {cfg.tokenizer.vocab_size}")
    if not cfg.quantize.variants:
        errors.append("quantize.variants: list at least one variant, for example [fp32]")
    for v in cfg.quantize.variants:
        if v not in _QUANT_VARIANTS:
            errors.append(f"quantize.variants: {v!r} is not one of {', '.join(_QUANT_VARIANTS)}")
    if not 0 < cfg.serve.port < 65536:
        errors.append(f"serve.port: {cfg.serve.port} is not a TCP port")
    if cfg.serve.max_replicas and cfg.serve.max_replicas < cfg.serve.num_replicas:
        errors.append(f"serve.max_replicas: {cfg.serve.max_replicas} is below serve.num_replicas "
                      f"({cfg.serve.num_replicas}); set it to 0 for a fixed number of replicas")
    if cfg.serve.max_choices > cfg.serve.max_batch_size:
        errors.append(f"serve.max_choices: {cfg.serve.max_choices} is more than serve.max_batch_size "
                      f"({cfg.serve.max_batch_size}), so such a request could never run; lower it")
    if cfg.serve.max_choices > cfg.serve.max_queued_rows:
        errors.append(f"serve.max_choices: {cfg.serve.max_choices} is more than serve.max_queued_rows "
                      f"({cfg.serve.max_queued_rows}), so such a request could never be queued; lower it")
    errors.extend(_validate_numbers(cfg))
    errors.extend(_validate_promote(cfg))
    errors.extend(_validate_names(cfg))
    errors.extend(_validate_model(cfg))
    for section in _TRAINING_SECTIONS:
        errors.extend(_validate_training(cfg, section))
    errors.extend(_validate_candidates(cfg))
    return errors


def _validate_candidates(cfg: ExperimentConfig) -> list[str]:
    """quantize/evaluate/promote checks beyond the types."""
    errors = []
    if cfg.evaluate.device not in ("auto", "cpu", "cuda"):
        errors.append(f"evaluate.device: {cfg.evaluate.device!r} is not one of auto, cpu, cuda")
    if cfg.evaluate.cpu_threads <= 0:
        errors.append(f"evaluate.cpu_threads: must be positive, got {cfg.evaluate.cpu_threads}")
    if cfg.promote.tie_breaker_mode not in ("min", "max"):
        errors.append(f"promote.tie_breaker_mode: {cfg.promote.tie_breaker_mode!r} is not one of min, max")
    return errors


def _validate_model(cfg: ExperimentConfig) -> list[str]:
    """The model's shape, checked now rather than after the data stage has run."""
    from components import model as gpt  # imports torch; only needed here

    m = cfg.model
    if m.preset not in gpt.PRESETS:
        return [f"model.preset: {m.preset!r} is not one of {', '.join(gpt.PRESETS)}"]
    errors = []
    for key in ("n_layer", "n_head", "n_embd"):
        value = getattr(m, key)
        if value is not None and value <= 0:
            errors.append(f"model.{key}: must be positive, got {value}")
    if not 0.0 <= m.dropout < 1.0:
        errors.append(f"model.dropout: must be in [0, 1), got {m.dropout}")
    if m.pad_vocab_to <= 0:
        errors.append(f"model.pad_vocab_to: must be positive, got {m.pad_vocab_to}")
    if errors:
        return errors
    shape = _model_shape(cfg)
    if shape["n_embd"] % shape["n_head"]:
        errors.append(f"model.n_head: {shape['n_head']} heads do not divide n_embd {shape['n_embd']} "
                      f"(preset {m.preset!r} plus overrides); pick n_head dividing n_embd")
    return errors


def _model_shape(cfg: ExperimentConfig) -> dict | None:
    """n_layer, n_head and n_embd of the preset with the YAML's overrides; None when they are not valid."""
    from components import model as gpt

    m = cfg.model
    if m.preset not in gpt.PRESETS:
        return None
    shape = {**gpt.PRESETS[m.preset], **{k: getattr(m, k) for k in ("n_layer", "n_head", "n_embd")
                                         if getattr(m, k) is not None}}
    return shape if all(isinstance(v, int) and v > 0 for v in shape.values()) else None


def _validate_tensor_parallel(cfg: ExperimentConfig, section: str) -> list[str]:
    """A tp layout that cannot be built fails here, before Ray starts a worker."""
    t: TrainingConfig = getattr(cfg, section)
    if t.tp_degree <= 0:
        return [f"{section}.tp_degree: must be positive, got {t.tp_degree}"]
    if t.strategy not in TENSOR_PARALLEL:
        if t.tp_degree != 1:
            return [f"{section}.tp_degree: {t.tp_degree} only applies to strategy tp or fsdp+tp "
                    f"({section}.strategy is {t.strategy!r}); set it to 1 or change the strategy"]
        return []
    errors = []
    if t.tp_degree > t.num_workers:
        errors.append(f"{section}.tp_degree: {t.tp_degree} tensor-parallel workers are more than "
                      f"{section}.num_workers ({t.num_workers})")
    elif t.num_workers % t.tp_degree:
        errors.append(f"{section}.tp_degree: {t.tp_degree} does not divide {section}.num_workers "
                      f"({t.num_workers}); the workers form groups of tp_degree")
    shape = _model_shape(cfg)
    if shape is not None:
        if shape["n_head"] % t.tp_degree:
            errors.append(f"{section}.tp_degree: {t.tp_degree} does not divide the model's {shape['n_head']} "
                          f"attention heads (model.n_head); each worker computes whole heads")
        if shape["n_embd"] % t.tp_degree:
            errors.append(f"{section}.tp_degree: {t.tp_degree} does not divide the model's hidden size "
                          f"{shape['n_embd']} (model.n_embd)")
    if section == "finetune" and cfg.finetune.method == "lora":
        errors.append("finetune.strategy: tp and fsdp+tp do not support finetune.method lora yet (the adapters "
                      "wrap the Linears that tensor parallelism splits); use method full, or strategy ddp or fsdp")
    return errors


def data_parallel_workers(training: TrainingConfig) -> int:
    """Workers that train on different rows: a tensor-parallel group shares one batch."""
    if training.strategy in TENSOR_PARALLEL and training.tp_degree > 0:
        return max(1, training.num_workers // training.tp_degree)
    return training.num_workers


def _validate_training(cfg: ExperimentConfig, section: str) -> list[str]:
    """The training keys shared by pretrain and finetune: all checked before Ray starts."""
    t: TrainingConfig = getattr(cfg, section)
    errors = []
    for key in ("checkpoint_every", "keep_checkpoints", "eval_batches"):
        if getattr(t, key) <= 0:
            errors.append(f"{section}.{key}: must be positive, got {getattr(t, key)}")
    for key in ("eval_every", "max_failures", "tokens_per_step"):
        if getattr(t, key) < 0:
            errors.append(f"{section}.{key}: must not be negative, got {getattr(t, key)}")
    for key in ("cpus_per_worker", "gpus_per_worker"):
        if not getattr(t, key) > 0:  # also refuses NaN
            errors.append(f"{section}.{key}: must be positive, got {getattr(t, key)}")
    replicas = data_parallel_workers(t)
    micro_tokens = replicas * t.batch_size * cfg.data.block_size
    if t.tokens_per_step > 0 and micro_tokens > 0 and t.tokens_per_step % micro_tokens:
        errors.append(
            f"{section}.tokens_per_step: {t.tokens_per_step} is not a multiple of one micro-step's tokens "
            f"({replicas} data-parallel workers x {section}.batch_size {t.batch_size} x "
            f"data.block_size {cfg.data.block_size} = {micro_tokens})")
    if t.strategy != "ddp" and t.precision == "fp16":
        errors.append(f"{section}.precision: fp16 is not supported with strategy {t.strategy} (its gradient "
                      f"scaling is not wired for sharded gradients); use bf16")
    errors.extend(_validate_tensor_parallel(cfg, section))
    return errors


def grad_accum_steps(training: TrainingConfig, block_size: int) -> int:
    """Micro-steps per optimizer step that `tokens_per_step` asks for (1 when it is 0)."""
    micro_tokens = data_parallel_workers(training) * training.batch_size * block_size
    return max(1, training.tokens_per_step // micro_tokens) if training.tokens_per_step else 1


# Ranges of the numbers that the lists in _validate leave out: key -> (is the value fine, what it must be).
# `{t}` stands for each training section. Every number is also checked to be finite (_validate_numbers).
_RANGES = {
    "{t}.lr": (lambda v: v > 0, "must be positive"),
    "{t}.min_lr": (lambda v: v >= 0, "must not be negative"),
    "{t}.weight_decay": (lambda v: v >= 0, "must not be negative"),
    "{t}.grad_clip": (lambda v: v >= 0, "must not be negative (0 disables clipping)"),
    "finetune.lora_alpha": (lambda v: v > 0, "must be positive"),
    "promote.tie_tolerance": (lambda v: 0 <= v < 1, "must be at least 0 and below 1 (a relative distance)"),
    "serve.max_prompt_chars": (lambda v: v >= 1, "must be at least 1"),
    "serve.max_tokens_cap": (lambda v: v >= 1, "must be at least 1"),
    "serve.max_body_bytes": (lambda v: v >= 1024, "must be at least 1024"),
    "serve.max_choices": (lambda v: v >= 1, "must be at least 1"),
    "serve.num_gpus": (lambda v: 0 <= v <= 1 or (v > 1 and v == int(v)), "must be 0 to 1, or a whole number"),
    "serve.num_replicas": (lambda v: v >= 1, "must be at least 1"),
    "serve.max_replicas": (lambda v: v >= 0, "must not be negative (0: no autoscaling)"),
    "serve.target_ongoing_requests": (lambda v: v > 0, "must be positive"),
    "serve.max_batch_size": (lambda v: v >= 1, "must be at least 1 (1: no batching)"),
    "serve.batch_wait_timeout_s": (lambda v: 0 <= v <= 10, "must be 0 to 10 seconds"),
    "serve.max_queued_rows": (lambda v: v >= 1, "must be at least 1"),
    "serve.max_ongoing_requests": (lambda v: v >= 1, "must be at least 1"),
    "serve.max_queued_requests": (lambda v: v >= 1 or v == -1, "must be at least 1, or -1 for no limit"),
    "serve.poll_interval_s": (lambda v: v >= 0, "must not be negative (0: never)"),
    # Ray refuses fractional resource amounts above 1 ("must be whole numbers").
    "serve.num_cpus": (lambda v: 0 <= v <= 1 or (v > 1 and v == int(v)), "must be 0 to 1, or a whole number"),
}
_TRAINING_SECTIONS = ("pretrain", "finetune")
# A registered model name that MLflow takes (no '/' or ':') and that is also a safe folder name (serving cache).
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def _validate_numbers(cfg: ExperimentConfig) -> list[str]:
    """Every number finite (NaN and inf load as floats from YAML), then in its range."""
    errors = []
    flat = flatten(cfg)
    for key, value in flat.items():
        if isinstance(value, float) and not math.isfinite(value):
            errors.append(f"{key}: must be a finite number, got {value}")
    finite = {k for k, v in flat.items() if not (isinstance(v, float) and not math.isfinite(v))}
    for pattern, (ok, must) in _RANGES.items():
        for key in dict.fromkeys(pattern.format(t=t) for t in _TRAINING_SECTIONS):
            if key in finite and not ok(flat[key]):
                errors.append(f"{key}: {must}, got {flat[key]}")
    for t in _TRAINING_SECTIONS:
        section = getattr(cfg, t)
        if {f"{t}.lr", f"{t}.min_lr"} <= finite and section.min_lr > section.lr:
            errors.append(f"{t}.min_lr: must not exceed {t}.lr ({section.lr}), got {section.min_lr}")
        problem = seed_problem(section.seed)
        if problem:
            errors.append(f"{t}.seed: {problem}")
    if "evaluate.temperature" in finite:
        problem = temperature_problem(cfg.evaluate.temperature)
        if problem:
            errors.append(f"evaluate.temperature: {problem}")
    return errors


def _validate_promote(cfg: ExperimentConfig) -> list[str]:
    """Promotion settings that would otherwise fail (or be ignored) only after the whole run."""
    errors = []
    known = ", ".join(CANDIDATE_METRICS)
    for key in ("promote.metric", "promote.tie_breaker"):
        if get_dotted(cfg, key) not in CANDIDATE_METRICS:
            errors.append(f"{key}: {get_dotted(cfg, key)!r} is not a metric the candidates log; choose one of {known}")
    seen = set()
    for v in cfg.quantize.variants:
        if v in seen:
            errors.append(f"quantize.variants: {v!r} is listed more than once (each variant is one candidate)")
        seen.add(v)
    return errors


def _validate_names(cfg: ExperimentConfig) -> list[str]:
    if not _NAME.fullmatch(cfg.name):
        return [f"name: {cfg.name!r} cannot name an MLflow registered model; use up to 100 letters, digits, "
                f"'.', '_' or '-', starting with a letter or digit"]
    return []


def get_dotted(cfg, key: str):
    """`get_dotted(cfg, "pretrain.max_steps")` -> the value."""
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


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
