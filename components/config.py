"""The sections of an experiment: one frozen dataclass per stage, each field with its rules.

Every key has a default, so any section may be left out of an experiment file. Each field
carries its own rules (`checked(default, *rules)`, components/field_rules.py); the top level
that holds the sections, the checks that read two fields or two sections, and reading and
writing the YAML are in components/experiment_file.py.
"""
from __future__ import annotations

from dataclasses import dataclass

from components.field_rules import (at_least_1, checked, each, fraction, must_be, new_default, non_negative, one_of,
                                    positive, reported_by, required_text)
from components.eval_tasks import WHICH_BODY, task_spec_problem
from components.metrics import CANDIDATE_METRICS
from components.sampling import seed_problem, temperature_problem


# ----------------------------------------------------------------------------- rules of these fields

def _min_vocab(value: int) -> str | None:
    from components.tokenizer import EOT, MIN_VOCAB_SIZE

    if value < MIN_VOCAB_SIZE:
        return f"must be at least {MIN_VOCAB_SIZE} (256 bytes + {EOT}), got {value}"
    return None


def _init_from_problem(value: str) -> str | None:
    from components.base_model import init_from_problem

    return init_from_problem(value)


def _model_presets() -> tuple[str, ...]:
    from components.model import PRESETS  # imports torch

    return tuple(PRESETS)


def _quantize_variants() -> tuple[str, ...]:
    from components.quantize import VARIANTS  # imports torch

    return VARIANTS


def _candidate_metric(value: str) -> str | None:
    if value not in CANDIDATE_METRICS:
        return f"{value!r} is not a metric the candidates log; choose one of {', '.join(CANDIDATE_METRICS)}"
    return None


def _distinct_variants(variants: list[str]) -> list[str]:
    repeated = dict.fromkeys(v for i, v in enumerate(variants) if v in variants[:i])
    return [f"{v!r} is listed more than once (each variant is one candidate)" for v in repeated]


# Training strategies (components/parallel.py builds them); the last two split layers over a tp group.
STRATEGIES = ("ddp", "fsdp", "tp", "fsdp+tp")
TENSOR_PARALLEL = ("tp", "fsdp+tp")
_MIN_OR_MAX = one_of("min", "max")
# Ray refuses fractional resource amounts above 1 ("must be whole numbers").
_RAY_AMOUNT = must_be(lambda v: 0 <= v <= 1 or (v > 1 and v == int(v)), "must be 0 to 1, or a whole number")


# ----------------------------------------------------------------------------- sections

@dataclass(frozen=True)
class DataConfig:
    source: str = checked("stdlib", required_text)
    """`stdlib` (the Python standard library's own sources); a folder, read recursively: its
    .txt/.md/.py files (one document each), .jsonl files (one per line) and .parquet files (one
    per row); one such file; or a glob (`corpus/**/*.jsonl`). A local path or a storage URI
    (`s3://bucket/corpus/`)."""
    text_field: str = checked("text", required_text)
    """Field (jsonl) or column (parquet) holding the document text."""
    on_bad_utf8: str = checked("replace", one_of("replace", "skip"))
    """Bytes that are not UTF-8, and lone surrogates in JSON strings: `replace` them with U+FFFD,
    or `skip` the document. Either way they are counted and the files named in the manifest."""
    on_bad_json: str = checked("fail", one_of("fail", "skip"))
    """A .jsonl line that is not a JSON object: `fail` naming file:line, or `skip` it (counted)."""
    max_bytes: int = checked(0, non_negative)
    """Use a deterministic subset of about this many bytes of the corpus; 0 uses all of it."""
    block_size: int = checked(128, positive)
    """Tokens per training sequence (the model's context length)."""
    val_fraction: float = checked(0.05, fraction)
    """Share of documents held out for validation, chosen by a hash of the document's content
    (so a document and its copies are always on the same side)."""
    cache: bool = True
    """Reuse the prepared data of an earlier run with the same sources, data settings and code
    (the stage cache); false always prepares it again."""


@dataclass(frozen=True)
class TokenizerConfig:
    vocab_size: int = checked(4096, reported_by(_min_vocab))
    """Size of the byte-level BPE vocabulary trained on the corpus."""
    sample_bytes: int = checked(100_000_000, non_negative)
    """Train the tokenizer on a deterministic sample of about this many bytes of the training
    split; 0 trains on all of it."""
    file: str | None = checked(None, required_text)
    """A `tokenizer.json` (path or storage URI) to use instead of training one; its vocabulary
    size is used, and `<|endoftext|>` must be its id 0."""


@dataclass(frozen=True)
class ModelConfig:
    preset: str = checked("tiny", one_of(_model_presets))
    """One of components.model.PRESETS: tiny, mini, gpt2, gpt2-medium, gpt2-large, gpt2-xl."""
    n_layer: int | None = checked(None, positive)
    """Overrides the preset's number of transformer blocks."""
    n_head: int | None = checked(None, positive)
    """Overrides the preset's number of attention heads."""
    n_embd: int | None = checked(None, positive)
    """Overrides the preset's embedding width."""
    dropout: float = checked(0.0, must_be(lambda v: 0 <= v < 1, "must be in [0, 1)"))
    """Dropout probability in attention and MLP (0 for short runs)."""
    bias: bool = True
    """Biases in Linear and LayerNorm layers, as in GPT-2; false is a little faster and no worse."""
    pad_vocab_to: int = checked(1, positive)
    """Round the embedding's vocabulary up to a multiple of this (64 suits GPU matmuls; 1 = no padding).
    The extra rows are never a target, so they only cost memory."""

    def shape(self) -> dict | None:
        """n_layer, n_head and n_embd of the preset with this section's overrides; None when they are not valid."""
        from components.model import PRESETS  # imports torch

        if self.preset not in PRESETS:
            return None
        overrides = {k: getattr(self, k) for k in ("n_layer", "n_head", "n_embd") if getattr(self, k) is not None}
        shape = {**PRESETS[self.preset], **overrides}
        return shape if all(isinstance(v, int) and v > 0 for v in shape.values()) else None

    def padded_vocab(self, vocab_size: int) -> int:
        """`vocab_size` rounded up to a multiple of `pad_vocab_to`: the embedding's rows."""
        return -(-vocab_size // self.pad_vocab_to) * self.pad_vocab_to


@dataclass(frozen=True)
class TrainingConfig:
    """What pretraining and fine-tuning share: workers and the optimisation schedule."""

    num_workers: int = checked(2, positive)
    """Ray Train workers (processes); each gets one CPU or one GPU."""
    use_gpu: bool = False
    """Train on GPUs (nccl) instead of CPUs (gloo)."""
    max_steps: int = checked(200, positive)
    """Optimizer steps."""
    batch_size: int = checked(16, positive)
    """Sequences per worker per step."""
    lr: float = checked(1e-3, positive)
    """Peak learning rate (AdamW), reached after warmup, then cosine decay to min_lr."""
    min_lr: float = checked(1e-4, non_negative)
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = checked(20, non_negative)
    """Linear warmup steps."""
    weight_decay: float = checked(0.1, non_negative)
    """AdamW weight decay on 2-D weights."""
    grad_clip: float = checked(1.0, must_be(lambda v: v >= 0, "must not be negative (0 disables clipping)"))
    """Clip the global gradient norm to this; 0 disables clipping."""
    log_every: int = checked(1, positive)
    """Log training metrics to MLflow every this many steps. Reading the loss syncs the GPU, so
    on a GPU log every 10 or more steps."""
    seed: int = checked(1337, reported_by(seed_problem))
    """Seed for weights, adapters and data order."""
    strategy: str = checked("ddp", one_of(*STRATEGIES))
    """How the workers share the model: `ddp` (every worker holds all of it), `fsdp`
    (PyTorch FSDP2 `fully_shard`: parameters, gradients and optimizer state sharded over workers),
    `tp` (tensor parallel: each block's weight matrices split over groups of `tp_degree` workers,
    which see the same rows) or `fsdp+tp` (tensor parallel inside each group, FSDP2 across groups)."""
    tp_degree: int = checked(1, positive)
    """Workers per tensor-parallel group (strategies tp and fsdp+tp); must divide num_workers and
    the model's n_head. Put a group on one node: it talks at every layer."""
    precision: str = checked("auto", one_of("auto", "bf16", "fp16", "fp32"))
    """`bf16` (autocast), `fp16` (autocast + gradient scaling), `fp32`, or `auto`: bf16 on a GPU,
    fp32 on a CPU. Weights stay fp32; checkpoints are fp32."""
    compile: bool = False
    """torch.compile the model (much faster on a GPU; the first steps compile, 15 s or more)."""
    tokens_per_step: int = checked(0, non_negative)
    """Tokens per optimizer step over all workers. More than one micro-batch per worker
    (num_workers x batch_size x block_size) accumulates gradients; 0 means one micro-batch."""
    eval_every: int = checked(100, non_negative)
    """Measure the validation loss (`val/loss`) every this many steps and at the end; 0 never."""
    eval_batches: int = checked(4, positive)
    """Batches per worker for each validation loss."""
    checkpoint_every: int = checked(100, positive)
    """Save model, optimizer, step, RNG state and data position every this many steps (and at the end).
    A worker that dies loses at most this many steps."""
    keep_checkpoints: int = checked(2, positive)
    """Checkpoints kept in Ray Train's storage (the newest ones)."""
    max_failures: int = checked(1, non_negative)
    """Times Ray Train restarts the workers after one dies, continuing from the last checkpoint."""
    cpus_per_worker: float = checked(1.0, positive)
    """CPUs Ray reserves for each training worker."""
    gpus_per_worker: float = checked(1.0, positive)
    """GPUs Ray reserves for each training worker when use_gpu is true."""
    cache: bool = True
    """Reuse the checkpoint of an earlier run whose stage key (code, this section, its inputs) is the
    same (the stage cache); false always trains again."""

    def data_parallel_workers(self) -> int:
        """Workers that train on different rows: a tensor-parallel group shares one batch."""
        if self.strategy in TENSOR_PARALLEL and self.tp_degree > 0:
            return max(1, self.num_workers // self.tp_degree)
        return self.num_workers

    def micro_step_tokens(self, block_size: int) -> int:
        """Tokens that one micro-batch of every data-parallel worker holds together."""
        return self.data_parallel_workers() * self.batch_size * block_size

    def grad_accum_steps(self, block_size: int) -> int:
        """Micro-steps per optimizer step that `tokens_per_step` asks for (1 when it is 0)."""
        return max(1, self.tokens_per_step // self.micro_step_tokens(block_size)) if self.tokens_per_step else 1


@dataclass(frozen=True)
class PretrainConfig(TrainingConfig):
    enabled: bool = True
    """Pretrain a fresh model on `data.source`. false skips the stage; it needs `finetune.init_from`
    (the model fine-tuning starts from instead)."""


@dataclass(frozen=True)
class FinetuneConfig(TrainingConfig):
    # Fine-tuning defaults differ from pretraining's: fewer steps on one worker, no decay.
    num_workers: int = new_default(TrainingConfig, "num_workers", 1)
    max_steps: int = new_default(TrainingConfig, "max_steps", 100)
    warmup_steps: int = new_default(TrainingConfig, "warmup_steps", 10)
    weight_decay: float = new_default(TrainingConfig, "weight_decay", 0.0)
    eval_every: int = new_default(TrainingConfig, "eval_every", 50)
    checkpoint_every: int = new_default(TrainingConfig, "checkpoint_every", 50)

    source: str = checked("stdlib", required_text)
    """Prompt/completion pairs: `stdlib` (function signature+docstring -> body, via ast),
    a folder of .py files, or a .jsonl with `prompt` and `completion` fields. With
    `format: chat`, a .jsonl or .parquet whose rows hold a `messages` list instead."""
    format: str = checked("pairs", one_of("pairs", "chat"))
    """`pairs`: prompt/completion, the loss on the completion. `chat`: conversations of
    {role, content} messages (system/user/assistant) rendered with the ChatML template, the
    loss on the assistant's turns only; `stdlib` or a .py folder gives one conversation per
    function (the user asks for it by signature and docstring, the assistant writes its body)."""
    max_bytes: int = checked(0, non_negative)
    """Read about this many bytes of `source` to find pairs; 0 reads all of it."""
    max_pairs: int = checked(0, non_negative)
    """Keep at most this many pairs (deterministic subset); 0 keeps all."""
    heldout_fraction: float = checked(0.1, fraction)
    """Share of pairs held out to measure completion loss."""
    method: str = checked("lora", one_of("lora", "full"))
    """`lora` (low-rank adapters, merged back after training) or `full`."""
    lora_rank: int = checked(8, positive)
    """Rank of the LoRA adapters."""
    lora_alpha: float = checked(16.0, positive)
    """LoRA scaling numerator (the update is scaled by alpha / rank)."""
    init_from: str | None = checked(None, required_text, reported_by(_init_from_problem))
    """The model fine-tuning starts from. Unset: the pretrain stage's output. Else a gptforge model
    folder (path or storage URI), a Hugging Face GPT-2 folder (converted on the fly), or
    `models:/NAME@ALIAS` / `models:/NAME/VERSION` from the MLflow registry (checked against its
    pinned sha256). With a starting model, the data stage uses its tokenizer and `model.*` comes
    from it (`tokenizer.file` and a differing `model.n_layer/n_head/n_embd` are refused); with
    `pretrain.enabled: false` no pretraining runs."""

    @property
    def uses_lora(self) -> bool:
        """Whether fine-tuning trains low-rank adapters rather than every weight."""
        return self.method == "lora"


@dataclass(frozen=True)
class QuantizeConfig:
    variants: list[str] = checked(
        ["fp32", "int8_dynamic"],
        reported_by(lambda v: None if v else "list at least one variant, for example [fp32]"),
        each(one_of(_quantize_variants)),
        _distinct_variants)
    """Candidates to build from the fine-tuned model: fp32, bf16, fp16, int8_dynamic (CPU),
    int8_weight_only, int4_weight_only (CUDA). A variant that cannot run here is skipped,
    with the reason on its run. fp32, when listed, is the reference for the deltas."""


@dataclass(frozen=True)
class EvaluateConfig:
    max_batches: int = checked(20, non_negative)
    """Validation batches per candidate for perplexity (0 = the whole split)."""
    batch_size: int = checked(16, positive)
    """Sequences per evaluation batch."""
    gen_tokens: int = checked(32, non_negative)
    """Tokens generated per sample and per fixed prompt, also used to measure generation speed."""
    num_samples: int = checked(3, non_negative)
    """Generated samples logged per candidate (prompts from the held-out pairs)."""
    temperature: float = checked(0.0, reported_by(temperature_problem))
    """Sampling temperature for the samples; 0 is greedy, so runs are comparable."""
    device: str = checked("auto", one_of("auto", "cpu", "cuda"))
    """`auto` (each candidate on the GPU when there is one and its variant runs there, else
    the CPU), `cpu`, or `cuda` (variants that cannot run there are skipped)."""
    cpu_threads: int = checked(1, positive)
    """torch threads for a candidate evaluated on the CPU; the same for all, so speeds compare."""
    prompts: list[str] = checked([
        "def fibonacci(n):\n", "import os\n", "class Stack:\n    def __init__(self):\n", "for i in range(10):\n",
    ])
    """Fixed prompts whose greedy continuations are logged side by side across candidates."""
    bpb_max_bytes: int = checked(131072, non_negative)
    """UTF-8 bytes of held-out documents that `eval/val_bpb` is measured on (0 = all the data stage
    kept, at most 1 MiB); the same text for every candidate and for the re-evaluated champion."""
    tasks: list[str] = checked([WHICH_BODY], each(reported_by(task_spec_problem)))
    """lm-eval tasks every candidate and the re-evaluated champion are scored on, logged as
    `eval/task/<task>/<metric>`: `gptforge_which_body` (which of 4 held-out function bodies belongs to
    a signature and docstring; chance 25%), the path of a local lm-eval task YAML, or an lm-eval task
    name whose data is already in the local Hugging Face cache (nothing is downloaded). [] runs none."""
    task_limit: int = checked(256, non_negative)
    """Items scored per task (lm-eval's `limit`; 0 = all): 256 keeps a candidate's tasks to seconds on a
    CPU while one item is under half a point of accuracy."""
    suite: str = ""
    """The evaluation suite every candidate and the champion are judged on (`eval/suite_bpb`,
    `eval/suite_completion_bpb`, the task items): empty (the default) uses the one pinned for the
    experiment, which its first run pins from its own held-out documents and pairs (re-pin on
    purpose with `gptforge suite pin`); or a suite folder or URI, used as is. Its documents and
    pairs never land on a run's training side. Its size is the data stage's held-out text (at
    most 1 MiB), of which `bpb_max_bytes` are read."""


@dataclass(frozen=True)
class PromoteConfig:
    metric: str = checked("eval/suite_bpb", reported_by(_candidate_metric))
    """Metric that decides the best candidate and whether it replaces the champion (one of
    components.metrics.CANDIDATE_METRICS). The default, bits per byte on the experiment's
    evaluation suite (evaluate.suite), compares across data and tokenizers. The champion is
    re-evaluated beside the candidates on `eval/suite_bpb`, `eval/suite_completion_bpb`,
    `eval/val_bpb`, `eval/completion_bpb` (the run's own held-out side), `model/size_bytes` and the
    tasks (`eval/task/...`); other metrics are compared with the value the champion logged, and only
    when it was trained on the same data."""
    mode: str = checked("min", _MIN_OR_MAX)
    """`min` or `max`: which direction of `metric` is better."""
    tie_tolerance: float = checked(
        0.01, must_be(lambda v: 0 <= v < 1, "must be at least 0 and below 1 (a relative distance)"))
    """Candidates within this relative distance of the best count as tied."""
    tie_breaker: str = checked("model/size_bytes", reported_by(_candidate_metric))
    """Among tied candidates the one with the best value of this metric wins. The defaults
    read "the smallest candidate whose val perplexity is within 1% of the best"; with
    tie_breaker eval/tokens_per_s, tie_breaker_mode max and tie_tolerance 0.02, "the
    fastest within 2%"."""
    tie_breaker_mode: str = checked("min", _MIN_OR_MAX)
    """`min` or `max`: which direction of `tie_breaker` wins."""
    max_completion_bpb_regression_pct: float | None = checked(5.0, non_negative)
    """Gate: a challenger whose `eval/suite_completion_bpb` (the suite's held-out completions after
    their prompts) is more than this many percent above the champion's, both measured side by side,
    is not promoted, whatever `metric` says. Unset (null) turns the gate off."""
    max_size_growth_pct: float | None = checked(None, non_negative)
    """Gate: a challenger whose `model/size_bytes` is more than this many percent above the
    champion's is not promoted. Unset (null, the default) turns the gate off."""
    max_task_accuracy_drop_points: float | None = checked(10.0, non_negative)
    """Gate: a challenger with a task accuracy (`eval/task/<task>/acc`, `acc_norm`, `exact_match`)
    more than this many percentage points below the champion's, both scored side by side on the
    same items (evaluate.tasks), is not promoted. Unset (null) turns the gate off. Mind the items:
    two different models near chance differ by luck alone by about 8 points (one standard deviation)
    on 64 items and 4 on 256, so a limit much under 10 blocks sound retrains on a small task; raise
    evaluate.task_limit (0: all) before tightening it."""


@dataclass(frozen=True)
class ServeConfig:
    host: str = checked("127.0.0.1", required_text)
    """Address the Serve HTTP proxy binds to."""
    port: int = checked(8000, reported_by(lambda v: None if 0 < v < 65536 else f"{v} is not a TCP port"))
    """Port of the Serve HTTP proxy."""
    max_prompt_chars: int = checked(4000, at_least_1)
    """Longest prompt accepted, in characters; longer ones get a 400 naming `prompt`."""
    max_tokens_cap: int = checked(256, at_least_1)
    """Largest `max_tokens` a request may ask for."""
    max_body_bytes: int = checked(65536, must_be(lambda v: v >= 1024, "must be at least 1024"))
    """Largest request body; a larger one gets 413 before it is read to the end."""
    max_choices: int = checked(16, at_least_1)
    """Most completions one request may ask for (prompts x `n`)."""
    num_cpus: float = checked(0.5, _RAY_AMOUNT)
    """CPUs reserved by each replica (kept small so training jobs still fit)."""
    num_gpus: float = checked(0.0, _RAY_AMOUNT)
    """GPUs reserved by each replica; 1 gives one replica per GPU, and the replica then runs on CUDA."""
    num_replicas: int = checked(1, at_least_1)
    """Replicas started; with `max_replicas` above it, the lower bound of autoscaling."""
    max_replicas: int = checked(0, must_be(lambda v: v >= 0, "must not be negative (0: no autoscaling)"))
    """Upper bound of Serve's autoscaling; 0 (or `num_replicas`) keeps a fixed number of replicas."""
    target_ongoing_requests: float = checked(16.0, positive)
    """Autoscaling target: requests in flight per replica."""
    max_batch_size: int = checked(16, must_be(lambda v: v >= 1, "must be at least 1 (1: no batching)"))
    """Most completions decoded together in one batch (one forward pass per token); 1 turns batching off."""
    batch_wait_timeout_s: float = checked(0.01, must_be(lambda v: 0 <= v <= 10, "must be 0 to 10 seconds"))
    """With `batching: static`, how long the first queued request waits for others to share its batch."""
    max_queued_rows: int = checked(64, at_least_1)
    """Completions that may wait in a replica's queue; past it a request gets 503 with Retry-After at once."""
    batching: str = checked("continuous", one_of("static", "continuous"))
    """`continuous` (the default): at every decode step finished completions leave the batch and queued
    ones join (up to `max_batch_size` rows and `max_step_tokens` tokens a step), so short completions are
    not held up by long ones. `static`: a batch runs until its longest completion ends, then the next
    batch starts (kept for comparison; on a CPU it is the slower of the two, benchmarks/RESULTS.md)."""
    max_step_tokens: int = checked(512, at_least_1)
    """With `batching: continuous`, the most tokens one step computes: one per running completion plus
    the joining prompts' tokens. A longer prompt is prefilled in chunks over the next steps (chunked
    prefill), so a long prompt cannot stall the running completions for long."""
    max_ongoing_requests: int = checked(128, at_least_1)
    """Serve's cap on requests in flight per replica (streams included); above `max_queued_rows`
    so that a full queue answers 503 itself, quickly, rather than Serve holding requests."""
    max_queued_requests: int = checked(
        128, must_be(lambda v: v >= 1 or v == -1, "must be at least 1, or -1 for no limit"))
    """Serve's cap on requests waiting for a replica; past it Serve answers 503."""
    poll_interval_s: float = checked(5.0, must_be(lambda v: v >= 0, "must not be negative (0: never)"))
    """How often a replica checks the registry alias it serves; when it moved, the replica loads the
    new version and switches to it without dropping a request. 0 turns it off."""
