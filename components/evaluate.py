"""Evaluate one candidate model under the metric names every candidate shares.

The names (`CANDIDATE_METRICS`: `eval/val_ppl`, `eval/tokens_per_s`,
`model/size_bytes`, ...) are the same for fp32 and quantized variants alike, so
MLflow's compare view lines the candidates up. The model is evaluated on the device
it was loaded on (`components.quantize.load_variant(folder, device)`); inputs follow it.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import torch
from tokenizers import Tokenizer
from torch import nn

from components import storage
from components.accounting import bytes_by_dtype, linear_bytes, parameter_counts
from components.artifacts import EvalReport, TokenizedData
from components.bpb import bpb_metrics, suite_bpb_metrics
from components.config import EvaluateConfig
from components.generation import complete, generate
from components.lm_eval_model import task_metrics
from components.metrics import (  # noqa: F401 - the names every candidate logs, re-exported
    CANDIDATE_METRICS, DELTA_METRICS, DTYPES, QUALITY_METRICS, SIZE_METRICS, SPEED_METRICS, SUITE_METRICS)
from components.model import IGNORE_INDEX
from components.rows import Sampling, TokenText
from components.tokenizer import eot_id
from components.train import to_inputs_and_targets

SPEED_PROMPTS = 8  # timed at batch 1 one after the other, then together as one batch of 8
SPEED_PROMPT_TOKENS = 32  # tokens of each timed prompt (fewer when the context is short)


def evaluate(
    model: nn.Module,
    cfg: EvaluateConfig,
    data: TokenizedData,
    *,
    variant: str,
    size_bytes: int,
    disk_bytes: tuple[dict[str, int], int] = ({}, 0),
    suite: TokenizedData | None = None,
) -> EvalReport:
    """Measure one candidate, on the device its weights are on.

    Args:
        model: the loaded candidate (any variant), in eval mode.
        cfg: the experiment's `evaluate:` section. The first `max_batches * batch_size`
            validation rows are used (all when max_batches is 0), the same rows for every
            candidate; `gen_tokens` are generated per sample, per fixed prompt (`prompts`,
            greedily, to read side by side across candidates) and per timed prompt.
        data: the data stage's record: its validation rows (`val_uri`), held-out
            prompt/completion rows (`sft_heldout_uri`) and tokenizer.
        size_bytes: size of the candidate's stored weights file.
        disk_bytes: (bytes per dtype, Linear-layer bytes) of that file
            (`components.quantize.stored_bytes`).
        suite: the evaluation suite as a data view (`components.suite.Suite.view`): bits per byte on
            it (`eval/suite_bpb`, `eval/suite_completion_bpb`) and the task items come from it, so
            they compare across runs; None: the tasks read `data`'s held-out pairs.

    Returns:
        EvalReport with every metric of CANDIDATE_METRICS but the DELTA_METRICS, samples
        from held-out prompts and the fixed prompts' generations.
    """
    model.eval()
    device = model.transformer.wpe.weight.device  # never quantized, so always a plain tensor
    limit = cfg.max_batches * cfg.batch_size if cfg.max_batches else None
    val = _read_rows(data.val_uri, ["tokens"], limit)
    heldout = _read_rows(data.sft_heldout_uri, ["tokens", "mask"], None)
    tokenizer = Tokenizer.from_str(storage.read_text(data.tokenizer_uri))
    eot = eot_id(tokenizer)  # 0 in gptforge's tokenizers, 50256 in GPT-2's
    text = TokenText(tokenizer, model.config.vocab_size)  # what the endpoint's engine decodes with
    # Generation first, before the loss passes leave their activations in the allocator.
    metrics = generation_metrics(model, val["tokens"], cfg.gen_tokens, text)
    val_loss, val_accuracy = mean_loss(model, val, cfg.batch_size)
    completion_loss, completion_accuracy = mean_loss(model, heldout, cfg.batch_size)
    metrics |= {
        "eval/val_loss": val_loss,
        "eval/val_ppl": math.exp(min(val_loss, 50.0)),
        "eval/val_accuracy": val_accuracy,
        "eval/completion_loss": completion_loss,
        "eval/completion_ppl": math.exp(min(completion_loss, 50.0)),
        "eval/completion_accuracy": completion_accuracy,
        "eval/on_cuda": float(device.type == "cuda"),
        "eval/cpu_threads": float(torch.get_num_threads()),
    }
    metrics |= size_metrics(model, size_bytes, disk_bytes)

    metrics |= bpb_metrics(model, tokenizer, data, cfg)  # a candidate reads text with the data's tokenizer
    metrics |= suite_bpb_metrics(model, tokenizer, suite, cfg) if suite is not None else {}
    metrics |= task_metrics(model, tokenizer, suite or data, cfg)  # evaluate.tasks through lm-eval: eval/task/...
    samples = []
    for tokens, mask in list(zip(heldout["tokens"], heldout["mask"]))[:cfg.num_samples]:
        prompt_ids = [int(t) for t in tokens[: int(np.argmax(mask))]]
        sampling = Sampling(max_tokens=cfg.gen_tokens, temperature=cfg.temperature,
                            top_k=50 if cfg.temperature > 0 else None)
        samples.append({
            "prompt": tokenizer.decode(prompt_ids),
            "generated": complete(model, text, prompt_ids, sampling, eot),  # as the endpoint answers
            "reference": tokenizer.decode([int(t) for t, m in zip(tokens, mask) if m]),
        })
    generations = {}
    for prompt in cfg.prompts:
        ids = tokenizer.encode(prompt, add_special_tokens=False).ids or [eot]
        generations[prompt] = complete(model, text, ids, Sampling(max_tokens=cfg.gen_tokens, temperature=0.0), eot)
    missing = set(CANDIDATE_METRICS) - set(DELTA_METRICS) - set(metrics) - (set() if suite else set(SUITE_METRICS))
    assert not missing, f"evaluate() forgot {sorted(missing)}"
    return EvalReport(variant=variant, metrics=metrics, samples=samples, generations=generations)


def size_metrics(model: nn.Module, size_bytes: int, disk_bytes: tuple[dict[str, int], int]) -> dict[str, float]:
    """Parameter count and bytes by dtype in memory and on disk, under the shared `model/*` names."""
    in_memory, (on_disk, disk_linear) = bytes_by_dtype(model), disk_bytes
    out = {
        "model/size_bytes": float(size_bytes),
        "model/params_total": float(parameter_counts(model)["total"]),
        "model/linear_bytes": float(linear_bytes(model)),
        "model/disk_linear_bytes": float(disk_linear),
    }
    for prefix, counts in (("model/bytes_", in_memory), ("model/disk_bytes_", on_disk)):
        out |= {f"{prefix}{d}": float(counts.get(d, 0)) for d in DTYPES}
        out[f"{prefix}other"] = float(sum(n for d, n in counts.items() if d not in DTYPES))
    return out


# ------------------------------------------------------------------ speed


@torch.no_grad()
def generation_metrics(model: nn.Module, rows: np.ndarray, gen_tokens: int,
                       text: TokenText | None = None) -> dict[str, float]:
    """Greedy decoding on the endpoint's engine (`generate`): batch-1 and batch-8 speed, latency, peak memory.

    The prompts are the first SPEED_PROMPT_TOKENS tokens of the first SPEED_PROMPTS rows of
    `rows` (the validation split), so every candidate decodes the same inputs. Every prompt
    generates exactly `gen_tokens` (no stop at end-of-text), after a warm-up, so candidates
    are timed on the same amount of work. On CUDA each step is synchronised before its
    timestamp, so the times are the GPU's. With `text`, each token is decoded as the endpoint does.
    """
    names = SPEED_METRICS[:7]
    if gen_tokens == 0 or len(rows) == 0:
        return dict.fromkeys(names, 0.0)
    device = model.transformer.wpe.weight.device
    prompt_len = max(1, min(SPEED_PROMPT_TOKENS, model.config.block_size - gen_tokens, len(rows[0])))
    batch = torch.tensor(np.stack([np.asarray(r[:prompt_len]) for r in rows[:SPEED_PROMPTS]]),
                         dtype=torch.long, device=device)  # (N, P), N <= 8
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    generate(model, batch[:1], 2, temperature=0.0)  # warm-up: first-call allocations and kernel choice
    generate(model, batch, 2, temperature=0.0)

    ttft, steps, total = [], [], 0.0
    stamps: list[float] = []

    def stamp(_token: torch.Tensor) -> None:
        sync()
        stamps.append(time.perf_counter())

    for row in batch:
        stamps.clear()
        sync()
        start = time.perf_counter()
        generate(model, row[None, :], gen_tokens, temperature=0.0, on_token=stamp, text=text)
        total += stamps[-1] - start
        ttft.append(stamps[0] - start)
        steps += [b - a for a, b in zip(stamps, stamps[1:])]
    sync()
    start = time.perf_counter()
    peak = _peak_memory(model, lambda: generate(model, batch, gen_tokens, temperature=0.0, text=text))
    sync()
    batch_seconds = time.perf_counter() - start
    tokens_per_s = len(batch) * gen_tokens / total
    return {
        "eval/tokens_per_s": tokens_per_s,
        "eval/tokens_per_s_batch8": len(batch) * gen_tokens / batch_seconds,
        "eval/ms_per_token": 1000.0 / tokens_per_s,
        "eval/ttft_ms": 1000.0 * statistics.median(ttft),
        "eval/token_ms_p50": 1000.0 * _percentile(steps, 50) if steps else 0.0,
        "eval/token_ms_p95": 1000.0 * _percentile(steps, 95) if steps else 0.0,
        "eval/peak_mem_bytes": float(peak),
    }


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def _peak_memory(model: nn.Module, fn) -> int:
    """Peak bytes the model takes while `fn` runs (its weights, KV cache and activations).

    CUDA: `torch.cuda.max_memory_allocated` over the call (weights included, as they live
    on the GPU). CPU: the weights' bytes plus how far the process's resident memory rose
    above where it was (Linux VmHWM, reset through /proc/self/clear_refs). Memory that the
    allocator freed earlier and hands out again does not show as a rise, so on CPU this is
    a lower bound; elsewhere than Linux only the weights are counted.
    """
    device = model.transformer.wpe.weight.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    weights = sum(bytes_by_dtype(model).values())
    try:
        before = _proc_status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark VmHWM to the current RSS
    except OSError:
        fn()
        return weights
    fn()
    return weights + max(0, _proc_status_kib("VmHWM") - before) * 1024


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


# ---------------------------------------------------------------- quality


def _read_rows(uri: str, columns: list[str], limit: int | None) -> dict[str, np.ndarray]:
    """Rows of a parquet file or a folder of shards, local or on storage; ids of any integer width."""
    fs, path = storage.resolve(uri)
    table = pq.read_table(path, columns=columns, filesystem=fs)
    if limit is not None:
        table = table.slice(0, limit)
    return {name: np.array(table.column(name).to_pylist()) for name in columns}  # (N, T+1) each


@torch.no_grad()
def mean_loss(model: nn.Module, rows: dict[str, np.ndarray], batch_size: int) -> tuple[float, float]:
    """Token-weighted mean cross-entropy and next-token accuracy over all rows (ignored targets excluded).

    Accuracy is the share of target tokens that are the model's most likely next token.
    """
    device = model.transformer.wpe.weight.device
    total, correct, count = 0.0, 0, 0
    for start in range(0, len(rows["tokens"]), batch_size):
        batch = {name: column[start : start + batch_size] for name, column in rows.items()}
        x, y = to_inputs_and_targets(batch)
        x, y = x.to(device), y.to(device)  # (B, T) each
        logits, _ = model(x)  # (B, T, vocab_size)
        keep = y != IGNORE_INDEX  # (B, T)
        n = int(keep.sum())
        if n == 0:
            continue
        loss = nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        total += float(loss)
        correct += int(((logits.argmax(dim=-1) == y) & keep).sum())
        count += n
    if count == 0:
        raise ValueError("no tokens to evaluate: the split is empty")
    return total / count, correct / count


# -------------------------------------------------------------- comparison


def reference_variant(reports: list[EvalReport]) -> str:
    """The candidate the deltas are measured against: fp32 when it was measured, else the first measured."""
    measured = [r.variant for r in reports if not r.skipped]
    return "fp32" if "fp32" in measured else (measured[0] if measured else "")


def add_deltas(reports: list[EvalReport]) -> list[EvalReport]:
    """Each measured report with DELTA_METRICS against `reference_variant` (skipped ones unchanged)."""
    reference = reference_variant(reports)
    if not reference:
        return reports
    ref = next(r for r in reports if r.variant == reference and not r.skipped).metrics
    out = []
    for r in reports:
        if r.skipped:
            out.append(r)
            continue
        m = r.metrics
        deltas = {
            "eval/val_ppl_delta_pct": 100.0 * (m["eval/val_ppl"] / ref["eval/val_ppl"] - 1.0),
            "eval/val_accuracy_delta": m["eval/val_accuracy"] - ref["eval/val_accuracy"],
            "eval/completion_loss_delta": m["eval/completion_loss"] - ref["eval/completion_loss"],
            "eval/completion_accuracy_delta": m["eval/completion_accuracy"] - ref["eval/completion_accuracy"],
            "eval/speedup": m["eval/tokens_per_s"] / ref["eval/tokens_per_s"] if ref["eval/tokens_per_s"] else 0.0,
            "model/size_ratio": m["model/size_bytes"] / ref["model/size_bytes"],
        }
        out.append(replace(r, metrics={**m, **deltas}))
    return out
