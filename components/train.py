"""The training loop shared by pretraining and fine-tuning.

It takes a model, an iterator of batches and a `report(metrics, checkpoint_dir)`
callback, and knows nothing about Ray: the same loop runs in one plain process
(tests) and inside Ray Train workers, where `report` forwards to
`ray.train.report`. When `torch.distributed` is initialised (DDP), the reported
loss is averaged over ranks.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

IGNORE_INDEX = -100  # targets with this value carry no loss (prompt tokens, padding)


@dataclass(frozen=True)
class LoopConfig:
    """Optimisation settings of one training run (a subset of a stage's config)."""

    max_steps: int
    lr: float
    min_lr: float
    warmup_steps: int
    weight_decay: float
    grad_clip: float
    log_every: int


def lr_at(step: int, cfg: LoopConfig) -> float:
    """Linear warmup to `lr`, then cosine decay to `min_lr` at `max_steps` (nanoGPT's schedule)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def make_optimizer(model: nn.Module, cfg: LoopConfig) -> torch.optim.AdamW:
    """AdamW over trainable parameters; no weight decay on biases and LayerNorm gains (1-D tensors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


def to_inputs_and_targets(batch: dict, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a batch of rows into next-token inputs and targets.

    Args:
        batch: `tokens` (B, T+1) and optionally `mask` (B, T+1), 1 where the
            token is trained on. Arrays may be numpy (object arrays of rows, as
            Ray Data yields list columns) or tensors.

    Returns:
        (x, y), both (B, T) long; y is IGNORE_INDEX where the mask is 0.
    """
    tokens = _as_long_tensor(batch["tokens"])  # (B, T+1)
    x, y = tokens[:, :-1], tokens[:, 1:].clone()  # (B, T), (B, T)
    if batch.get("mask") is not None:
        mask = _as_long_tensor(batch["mask"])[:, 1:]  # (B, T): mask of each target token
        y[mask == 0] = IGNORE_INDEX
    return x.to(device), y.to(device)


def _as_long_tensor(rows) -> torch.Tensor:
    if isinstance(rows, torch.Tensor):
        return rows.long()
    array = np.asarray(rows)
    if array.dtype == object:  # one array per row
        array = np.stack(list(rows))
    return torch.from_numpy(array.astype(np.int64))


def train(
    model: nn.Module,
    batches: Iterator[dict],
    cfg: LoopConfig,
    report: Callable[[dict, str | None], None],
    save_checkpoint: Callable[[int], str | None],
    device: torch.device | str = "cpu",
) -> dict:
    """Run `cfg.max_steps` optimizer steps.

    Args:
        model: the model (possibly DDP-wrapped); forward(x, y) -> (logits, loss).
        batches: endless iterator of batches (see `to_inputs_and_targets`).
        report: called every `log_every` steps and at the last step with the
            metrics and, on the last step, the folder `save_checkpoint` returned.
            In a distributed run every rank calls it.
        save_checkpoint: writes the model for `step` and returns its folder
            (or None on ranks that do not write).

    Returns:
        The metrics of the last report.
    """
    optimizer = make_optimizer(model, cfg)
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    model.train()
    loss_sum, loss_count, tokens_since, tokens_seen = 0.0, 0, 0, 0
    window_start = time.perf_counter()
    metrics: dict = {}
    for step in range(cfg.max_steps):
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = to_inputs_and_targets(next(batches), device)
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = _clip(model, cfg.grad_clip)
        optimizer.step()

        loss_sum += loss.item()
        loss_count += 1
        tokens_since += x.numel() * world_size
        last = step == cfg.max_steps - 1
        if (step + 1) % cfg.log_every == 0 or last:
            elapsed = time.perf_counter() - window_start
            tokens_seen += tokens_since
            metrics = {
                "train/loss": _mean_over_ranks(loss_sum / loss_count, device),
                "train/lr": lr,
                "train/grad_norm": grad_norm,
                "train/tokens_per_s": tokens_since / max(elapsed, 1e-9),
                "train/tokens_seen": tokens_seen,
                "train/step": step + 1,
            }
            report(metrics, save_checkpoint(step + 1) if last else None)
            loss_sum, loss_count, tokens_since = 0.0, 0, 0
            window_start = time.perf_counter()
    return metrics


def _clip(model: nn.Module, max_norm: float) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))


def _mean_over_ranks(value: float, device) -> float:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float32, device=device)  # nccl needs it on the GPU
    dist.all_reduce(t)
    return float(t.item() / dist.get_world_size())


def repeat(make_epoch: Callable[[int], Iterable[dict]]) -> Iterator[dict]:
    """Endless batches: `make_epoch(epoch)` is called again each time an epoch runs out."""
    epoch = 0
    while True:
        empty = True
        for batch in make_epoch(epoch):
            empty = False
            yield batch
        if empty:
            raise ValueError("the training data yielded no batch: the split is smaller than one batch")
        epoch += 1
