"""Evaluate one candidate model under the metric names every candidate shares.

The names (`eval/val_ppl`, `eval/completion_loss`, `eval/tokens_per_s`,
`model/size_bytes`, ...) are the same for fp32 and quantized variants alike, so
MLflow's compare view lines the candidates up.
"""
from __future__ import annotations

import math
import time

import numpy as np
import pyarrow.parquet as pq
import torch
from tokenizers import Tokenizer
from torch import nn

from components.artifacts import EvalReport
from components.train import IGNORE_INDEX, to_inputs_and_targets

_SPEED_PROMPTS = 8  # held-out prompts timed per candidate


def evaluate(
    model: nn.Module,
    *,
    variant: str,
    val_uri: str,
    sft_heldout_uri: str,
    tokenizer_uri: str,
    size_bytes: int,
    max_batches: int = 20,
    batch_size: int = 16,
    gen_tokens: int = 32,
    num_samples: int = 3,
    temperature: float = 0.0,
    eos_id: int = 0,
) -> EvalReport:
    """Measure one candidate.

    Args:
        model: the loaded candidate (any variant), in eval mode.
        val_uri: packed validation rows; the first `max_batches * batch_size`
            rows are used (all when max_batches is 0), the same rows for every candidate.
        sft_heldout_uri: held-out prompt/completion rows (`tokens`, `mask`).
        size_bytes: size of the candidate's stored weights.
        gen_tokens: tokens generated per sample, and per timed prompt for `eval/tokens_per_s`.

    Returns:
        EvalReport with metrics `eval/val_loss`, `eval/val_ppl`,
        `eval/completion_loss`, `eval/completion_ppl`, `eval/tokens_per_s`,
        `eval/ms_per_token`, `model/size_bytes` and generated samples.
    """
    model.eval()
    limit = max_batches * batch_size if max_batches else None
    val = _read_rows(val_uri, ["tokens"], limit)
    val_loss = _mean_loss(model, val, batch_size)
    heldout = _read_rows(sft_heldout_uri, ["tokens", "mask"], None)
    completion_loss = _mean_loss(model, heldout, batch_size)

    tokenizer = Tokenizer.from_file(tokenizer_uri)
    prompts = [tokens[: int(np.argmax(mask))] for tokens, mask in zip(heldout["tokens"], heldout["mask"])]
    tokens_per_s = _generation_speed(model, prompts[:_SPEED_PROMPTS], gen_tokens)
    samples = []
    for prompt_ids, tokens, mask in list(zip(prompts, heldout["tokens"], heldout["mask"]))[:num_samples]:
        idx = torch.tensor(prompt_ids, dtype=torch.long)[None, :]  # (1, P)
        out = model.generate(idx, gen_tokens, temperature=temperature, top_k=50 if temperature > 0 else None,
                             eos_id=eos_id)
        samples.append({
            "prompt": tokenizer.decode(list(prompt_ids)),
            "generated": tokenizer.decode(out[0, idx.shape[1]:].tolist()),
            "reference": tokenizer.decode([int(t) for t, m in zip(tokens, mask) if m]),
        })
    metrics = {
        "eval/val_loss": val_loss,
        "eval/val_ppl": math.exp(min(val_loss, 50.0)),
        "eval/completion_loss": completion_loss,
        "eval/completion_ppl": math.exp(min(completion_loss, 50.0)),
        "eval/tokens_per_s": tokens_per_s,
        "eval/ms_per_token": 1000.0 / tokens_per_s if tokens_per_s else 0.0,
        "model/size_bytes": float(size_bytes),
    }
    return EvalReport(variant=variant, metrics=metrics, samples=samples)


@torch.no_grad()
def _generation_speed(model: nn.Module, prompts: list, gen_tokens: int) -> float:
    """Batch-1 decoding speed in new tokens per second.

    Every prompt generates exactly `gen_tokens` (no stop at end-of-text), after
    one warm-up call, so candidates are timed on the same amount of work.
    """
    if not prompts or gen_tokens == 0:
        return 0.0
    first = torch.tensor(prompts[0], dtype=torch.long)[None, :]  # (1, P)
    model.generate(first, min(4, gen_tokens), temperature=0.0)  # warm-up: first-call allocations
    start = time.perf_counter()
    for prompt_ids in prompts:
        model.generate(torch.tensor(prompt_ids, dtype=torch.long)[None, :], gen_tokens, temperature=0.0)
    return len(prompts) * gen_tokens / (time.perf_counter() - start)


def _read_rows(uri: str, columns: list[str], limit: int | None) -> dict[str, np.ndarray]:
    table = pq.read_table(uri, columns=columns)
    if limit is not None:
        table = table.slice(0, limit)
    return {name: np.array(table.column(name).to_pylist()) for name in columns}  # (N, T+1) each


@torch.no_grad()
def _mean_loss(model: nn.Module, rows: dict[str, np.ndarray], batch_size: int) -> float:
    """Token-weighted mean cross-entropy over all rows (ignored targets excluded)."""
    total, count = 0.0, 0
    for start in range(0, len(rows["tokens"]), batch_size):
        batch = {name: column[start : start + batch_size] for name, column in rows.items()}
        x, y = to_inputs_and_targets(batch)
        logits, _ = model(x)
        n = int((y != IGNORE_INDEX).sum())
        if n == 0:
            continue
        loss = nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        total += float(loss)
        count += n
    if count == 0:
        raise ValueError("no tokens to evaluate: the split is empty")
    return total / count
