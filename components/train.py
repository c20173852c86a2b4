"""The training loop shared by pretraining and fine-tuning.

It takes a (parallelized) model, an iterator of batches and callbacks, and knows
nothing about Ray or MLflow: the same loop runs in one plain process (tests,
benchmarks) and inside Ray Train workers, where the callbacks log to MLflow
and report checkpoints to Ray Train.

The hot path never waits for the GPU: the loss is summed on the device and read
only at log steps; batches are copied from pinned memory without blocking.
One optimizer step is `grad_accum` micro-steps; the gradient all-reduce runs
on the last one only.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from components.config import TrainingConfig
from components.devices import FP32, Precision, autocast
from components.model import IGNORE_INDEX
from components.parallel import clip_grad_norm, data_parallel_size, gradient_sync, is_fsdp, mixed_tensors, unwrap, \
    uses_autocast


def lr_at(step: int, cfg: TrainingConfig) -> float:
    """Linear warmup to `lr`, then cosine decay to `min_lr` at `max_steps` (nanoGPT's schedule)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def make_optimizer(model: nn.Module, cfg: TrainingConfig, device: torch.device | str = "cpu") -> torch.optim.AdamW:
    """AdamW over trainable parameters; no weight decay on biases and LayerNorm gains (1-D tensors).

    On a GPU the fused kernel updates every parameter in one launch.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = torch.device(device).type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=fused)


# ------------------------------------------------------------------ batches


def rows_from_arrow(table) -> dict:
    """A pyarrow batch of packed rows as (B, T+1) numpy arrays, without touching rows one by one.

    The `tokens` (and `mask`) columns are list arrays of equal-length rows, so their
    flat values reshape straight into a matrix (zero-copy where Arrow allows). Token ids are
    stored as narrow as the vocabulary allows (uint16 for most) and come out as int64.
    """
    out = {}
    for name in ("tokens", "mask"):
        if name in table.column_names:
            column = table.column(name).combine_chunks()  # ListArray, (B,) of length-(T+1) lists
            out[name] = column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), -1)  # (B, T+1)
    if "tokens" in out:
        out["tokens"] = out["tokens"].astype(np.int64, copy=False)  # torch has no uint16 arithmetic
    return out


def to_inputs_and_targets(batch: dict, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a batch of rows into next-token inputs and targets.

    Args:
        batch: `tokens` (B, T+1) and optionally `mask` (B, T+1), 1 where the
            token is trained on. Arrays may be numpy (2-D, or object arrays of
            rows) or tensors.

    Returns:
        (x, y), both (B, T) long; y is IGNORE_INDEX where the mask is 0.
    """
    tokens = _as_long_tensor(batch["tokens"])  # (B, T+1)
    x, y = tokens[:, :-1], tokens[:, 1:].clone()  # (B, T), (B, T)
    if batch.get("mask") is not None:
        mask = _as_long_tensor(batch["mask"])[:, 1:]  # (B, T): mask of each target token
        y[mask == 0] = IGNORE_INDEX
    return _to_device(x, device), _to_device(y, device)


def _as_long_tensor(rows) -> torch.Tensor:
    if isinstance(rows, torch.Tensor):
        return rows.long()
    array = np.asarray(rows)
    if array.dtype == object:  # one array per row
        array = np.stack(list(rows))
    return torch.from_numpy(array.astype(np.int64))


def _to_device(t: torch.Tensor, device) -> torch.Tensor:
    device = torch.device(device)
    if device.type != "cuda":
        return t.contiguous()
    # From pinned memory the copy is asynchronous: the CPU prepares the next batch meanwhile.
    return t.contiguous().pin_memory().to(device, non_blocking=True)


class Batches:
    """Endless batches over epochs, knowing its position so a checkpoint can record it.

    `make_epoch(epoch)` gives the batches of one epoch (seeded, so an epoch's order is
    the same when made again); after a restart, `Batches(make_epoch, position)` with the
    checkpoint's `position()` skips the batches of that epoch that were already consumed.
    """

    def __init__(self, make_epoch: Callable[[int], Iterable[dict]], position: dict | None = None):
        position = position or {"epoch": 0, "batch": 0}
        self._make_epoch = make_epoch
        self.epoch, self.batch = position["epoch"], 0
        self._it = iter(make_epoch(self.epoch))
        self._empty_epoch = True
        for _ in range(position["batch"]):
            next(self)

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> dict:
        while True:
            try:
                item = next(self._it)
            except StopIteration:
                if self._empty_epoch and self.batch == 0:
                    raise ValueError("the training data yielded no batch: the split is smaller than one batch") from None
                self.epoch, self.batch, self._empty_epoch = self.epoch + 1, 0, True
                self._it = iter(self._make_epoch(self.epoch))
                continue
            self.batch += 1
            self._empty_epoch = False
            return item

    def position(self) -> dict:
        """{"epoch", "batch"}: batches of `epoch` consumed so far."""
        return {"epoch": self.epoch, "batch": self.batch}


def repeat(make_epoch: Callable[[int], Iterable[dict]]) -> Iterator[dict]:
    """Endless batches: `make_epoch(epoch)` is called again each time an epoch runs out."""
    return Batches(make_epoch)


# --------------------------------------------------------------------- loop


@dataclass
class Hooks:
    """What the loop calls out to; every rank calls each of them at the same steps.

    log(metrics, step): every `log_every` steps, at eval steps and at the last step.
    checkpoint(step, optimizer): every `checkpoint_every` steps and at the last step;
        saves and reports the checkpoint (a collective under FSDP).
    validate(): the validation loss averaged over ranks, every `eval_every` steps.
    """

    log: Callable[[dict, int], None] = lambda metrics, step: None
    checkpoint: Callable[[int, torch.optim.Optimizer], None] = lambda step, optimizer: None
    validate: Callable[[], float] | None = None


def train(
    model: nn.Module,
    batches: Iterator[dict],
    cfg: TrainingConfig,
    hooks: Hooks,
    device: torch.device | str = "cpu",
    precision: Precision = FP32,
    optimizer: torch.optim.Optimizer | None = None,
    start_step: int = 0,
    grad_accum: int = 1,
    flops_per_token: int | None = None,
    peak_flops: float | None = None,
) -> dict:
    """Run optimizer steps `start_step` .. `cfg.max_steps - 1`.

    Args:
        model: the model as `components.parallel.parallelize` returned it;
            forward(x, y) -> (logits, loss).
        batches: endless iterator of batches (see `to_inputs_and_targets`).
        cfg: the pretrain or finetune section: the schedule, clipping, and how often to log,
            validate and checkpoint.
        optimizer: to continue a checkpointed run; by default a fresh `make_optimizer`.
        grad_accum: micro-batches per optimizer step (`TrainingConfig.grad_accum_steps`).
        flops_per_token, peak_flops: for `train/mfu` (omitted when either is None).

    Returns:
        The metrics of the last log.
    """
    device = torch.device(device)
    optimizer = optimizer or make_optimizer(model, cfg, device)
    scaler = torch.amp.GradScaler(device.type) if precision.needs_grad_scaler else None
    cast = uses_autocast(model, precision)
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    replicas = data_parallel_size(model)  # the ranks of a tensor-parallel group share their rows
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    loss_sum = torch.zeros((), device=device)  # summed on the device: reading it would sync the GPU
    window_steps, tokens_since, tokens_seen = 0, 0, 0
    data_wait = 0.0  # seconds of this window spent waiting for batches
    window_start = time.perf_counter()
    metrics: dict = {}
    grad_norm = torch.zeros(())
    for step in range(start_step, cfg.max_steps):
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        fetch_start = time.perf_counter()
        micro = [to_inputs_and_targets(next(batches)) for _ in range(grad_accum)]  # on the CPU
        data_wait += time.perf_counter() - fetch_start
        # Weight each micro-batch by its share of the step's trained tokens, so that k
        # micro-batches give the same update as one batch k times larger, masks included.
        counts = [int((y != IGNORE_INDEX).sum()) for _, y in micro]
        total = max(1, sum(counts))
        for i, (x, y) in enumerate(micro):
            x, y = _to_device(x, device), _to_device(y, device)
            with gradient_sync(model, enabled=i == len(micro) - 1):
                with autocast(precision, device) if cast else contextlib.nullcontext():
                    _, loss = model(x, y)
                weighted = loss * (counts[i] / total)
                (scaler.scale(weighted) if scaler else weighted).backward()
            loss_sum += weighted.detach()
            tokens_since += x.numel() * replicas
        if scaler:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        with mixed_tensors(model):
            grad_norm = clip_grad_norm(params, cfg.grad_clip)  # 0: no clipping; the norm stays on the device
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        window_steps += 1

        done = step + 1
        last = done == cfg.max_steps
        evaluate_now = hooks.validate is not None and cfg.eval_every > 0 and (done % cfg.eval_every == 0 or last)
        if done % cfg.log_every == 0 or last or evaluate_now:
            mean_loss = _mean_over_ranks(loss_sum / window_steps)  # the one GPU sync of a log step
            elapsed = time.perf_counter() - window_start
            tokens_seen += tokens_since
            tokens_per_s = tokens_since / max(elapsed, 1e-9)
            metrics = {
                "train/loss": mean_loss,
                "train/lr": lr,
                "train/grad_norm": float(grad_norm),
                "train/tokens_per_s": tokens_per_s,
                # Share of the window's wall time spent getting batches: a feed that falls behind
                # shows here. On a GPU the device may still be busy with earlier steps meanwhile.
                "train/data_wait_frac": min(1.0, data_wait / max(elapsed, 1e-9)),
                "train/tokens_seen": tokens_seen,
                "train/step": done,
            }
            if flops_per_token and peak_flops:
                metrics["train/mfu"] = tokens_per_s / world_size * flops_per_token / peak_flops
            if device.type == "cuda":
                metrics["train/peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
            if evaluate_now:
                metrics["val/loss"] = hooks.validate()
                model.train()
            hooks.log(metrics, done)
            loss_sum.zero_()
            window_steps, tokens_since, data_wait = 0, 0, 0.0
            window_start = time.perf_counter()  # validation time does not count against tokens/s
        if last or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0):
            hooks.checkpoint(done, optimizer)
            window_start = time.perf_counter()
    return metrics


@torch.no_grad()
def validation_loss(model: nn.Module, batches: Iterable[dict], num_batches: int, device: torch.device | str = "cpu",
                    precision: Precision = FP32) -> float:
    """Mean loss over `num_batches` batches (averaged over ranks); the model is left in eval mode.

    Every rank must run the same number of forwards (FSDP gathers parameters in each),
    so `batches` should cycle when a rank's share is short.
    """
    device = torch.device(device)
    evaluating = model if is_fsdp(model) else unwrap(model)  # no DDP hooks, no recompiles for eval
    evaluating.eval()
    cast = uses_autocast(model, precision)
    total = torch.zeros((), device=device)
    count = 0
    for batch in batches:
        if count == num_batches:
            break
        x, y = to_inputs_and_targets(batch, device)
        with autocast(precision, device) if cast else contextlib.nullcontext():
            _, loss = evaluating(x, y)
        total += loss.float()
        count += 1
    return _mean_over_ranks(total / max(count, 1))


def _mean_over_ranks(value: torch.Tensor) -> float:
    if not dist.is_initialized():
        return float(value)
    t = value.detach().float().reshape(1).clone()
    dist.all_reduce(t)
    return float(t.item() / dist.get_world_size())

