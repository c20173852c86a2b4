"""The training recipe of pretraining and fine-tuning: prepare, train, save and resume.

It reads top to bottom the way nanoGPT's `train.py` does: build the model (fresh or
from a model folder), add LoRA adapters, restore the newest checkpoint, `parallelize`,
make the optimizer, place the data where the checkpoint left it, then run the loop of
`components/train.py`, saving a checkpoint every `checkpoint_every` steps.

The distributed runtime supplies only what is its own: the device, this rank's rows
(`Feed`), the checkpoints it knows of, and the hooks that log and report a checkpoint
(`RunHooks`). `pipelines/ray_runtime.py` adapts Ray Train to it; the tests run it in
one process and on `torch.multiprocessing` gloo ranks. Every rank runs the recipe and
calls every hook (some are collectives); the runtime decides which rank's calls count.
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from components import checkpoint as ckpt
from components import accounting, devices, finetune, parallel, tensor_parallel
from components import model as gpt
from components.config import FinetuneConfig, TrainingConfig
from components.train import Batches, Hooks, make_optimizer, train, validation_loss


@dataclass(frozen=True)
class TrainPlan:
    """What to train, everything but the runtime: plain data, so it pickles to every worker."""

    training: TrainingConfig
    """The experiment's pretrain or finetune section, whole."""
    model: gpt.GPTConfig
    """The architecture trained (for fine-tuning: the starting model's)."""
    init_from: str | None = None
    """A model folder to start from (fine-tuning); None starts from fresh weights."""
    extra_files: tuple[str, ...] = ()
    """Files copied into every checkpoint, so that it is a complete model folder (the tokenizer)."""

    @property
    def lora(self) -> FinetuneConfig | None:
        """The section when it trains LoRA adapters only, else None."""
        t = self.training
        return t if isinstance(t, FinetuneConfig) and t.uses_lora else None

    @property
    def grad_accum(self) -> int:
        return self.training.grad_accum_steps(self.model.block_size)


@dataclass(frozen=True)
class Feed:
    """This rank's rows, as the runtime delivers them: batches of `{"tokens", "mask"}` (B, T+1) arrays."""

    train_epoch: Callable[[int, int], Iterable[dict]]
    """`(epoch, seed)` -> the batches of one epoch of this rank's training rows, shuffled with `seed`
    (the same seed gives the same order, so a resumed run skips exactly the batches it consumed)."""
    val_pass: Callable[[], Iterable[dict]] | None = None
    """One pass over this rank's validation rows; None: no validation loss."""


def _ignore(*args) -> None:
    return None


@dataclass(frozen=True)
class RunHooks:
    """What the recipe calls out to. Every rank calls each hook at the same points."""

    log: Callable[[dict, int | None], None] = _ignore
    """Metrics at a step (None: not tied to a step, such as the parameter shares)."""
    log_params: Callable[[dict], None] = _ignore
    """Parameters of the run: the trained model's parameter counts (`trainable.*`)."""
    started: Callable[[int | None], None] = _ignore
    """Called once the model is restored and placed: the step resumed from, or None for a fresh start.
    A collective is allowed here (every rank calls it)."""
    report: Callable[[dict, str | None], None] = _ignore
    """A checkpoint was written: `(metrics with "step", folder)`; the folder is given on rank 0 only and is
    removed when the hook returns, so the hook copies what it keeps."""


def run(plan: TrainPlan, feed: Feed, hooks: RunHooks, device: torch.device,
        checkpoints: Iterable[str | None] = ()) -> dict:
    """Train `plan` on this rank; continue from the newest complete folder among `checkpoints`.

    Returns:
        The metrics of the last log step.
    """
    t = plan.training
    devices.configure_device(device)
    torch.manual_seed(t.seed)  # the same initial weights and adapters on every rank
    precision = devices.resolve_precision(t.precision, device)

    # ------------------------------------------------------------ prepare
    model = _build(plan)
    resume = ckpt.newest(checkpoints)  # (folder, step) or None
    if resume:
        ckpt.load_weights(resume[0], model)
    counts = accounting.parameter_counts(model)
    hooks.log_params({f"trainable.{k}": v for k, v in counts.items()})
    model = parallel.parallelize(model, t.strategy, device, precision, t.compile, t.tp_degree)
    hooks.log(accounting.parameter_shares(model, counts["total"]), None)  # a collective; rank 0 has every share
    optimizer = make_optimizer(model, t, device)
    start_step, position = 0, None
    if resume:
        state = ckpt.restore(resume[0], model, optimizer)
        start_step, position = state["step"], state["data"]
    hooks.started(resume[1] if resume else None)

    # --------------------------------------------------------------- data
    data = _RankData(model, feed, device, t.seed)
    batches = Batches(data.train_epoch, position)
    validate = None
    if t.eval_every and feed.val_pass is not None:
        validate = lambda: validation_loss(model, data.validation(), t.eval_batches, device, precision)

    # ---------------------------------------------------------- train, save
    latest: dict = {}  # the newest metrics, reported with each checkpoint

    def log(metrics: dict, step: int) -> None:
        latest.update(metrics)
        hooks.log(metrics, step)

    def save(step: int, optimizer: torch.optim.Optimizer) -> None:
        folder = tempfile.mkdtemp(prefix=f"gptforge-step{step}-") if _rank() == 0 else None
        try:
            ckpt.save(folder, model, optimizer, step, batches.position(), lambda: _build(plan, weights=False),
                      finetune.merge_lora if plan.lora else ckpt.as_trained, plan.extra_files)
            hooks.report({**latest, "step": step}, folder)
        finally:
            if folder:
                shutil.rmtree(folder, ignore_errors=True)

    return train(model, batches, t, Hooks(log=log, checkpoint=save, validate=validate), device, precision,
                 optimizer=optimizer, start_step=start_step, grad_accum=plan.grad_accum,
                 flops_per_token=gpt.flops_per_token(plan.model), peak_flops=devices.peak_flops(device))


def _build(plan: TrainPlan, weights: bool = True) -> nn.Module:
    """The model being trained: the starting folder's weights (or fresh ones), with LoRA adapters when asked.

    `weights=False` gives the architecture only (checkpoints build it on the meta device).
    """
    model = gpt.load_model(plan.init_from) if plan.init_from and weights else gpt.GPT(plan.model)
    if plan.lora:
        finetune.apply_lora(model, plan.lora.lora_rank, plan.lora.lora_alpha)
    return model


class _RankData:
    """This rank's batches under the model's layout.

    Data-parallel ranks each read their own rows. The ranks of a tensor-parallel group must
    train on the same rows: the runtime gives the group one shard, the group's first rank
    reads it and broadcasts the batches (`tensor_parallel.share_batches`), so the members
    see the same rows by construction, not by a shared seed.
    """

    def __init__(self, model: nn.Module, feed: Feed, device: torch.device, seed: int):
        self.feed, self.device, self.seed = feed, device, seed
        self.layout = parallel.tensor_parallel_layout(model)
        self.sharing = self.layout is not None and self.layout.tp_degree > 1
        self.reads = not self.sharing or self.layout.mesh["tp"].get_local_rank() == 0
        self.data_rank = self.layout.mesh["dp"].get_local_rank() if self.layout is not None else _rank()

    def _shared(self, batches: Iterable[dict] | None) -> Iterable[dict]:
        return tensor_parallel.share_batches(batches, self.layout, self.device) if self.sharing else batches

    def train_epoch(self, epoch: int) -> Iterable[dict]:
        seed = self.seed + epoch * 1000 + self.data_rank  # each data-parallel rank its own order
        return self._shared(self.feed.train_epoch(epoch, seed) if self.reads else None)

    def validation(self) -> Iterable[dict]:
        return self._shared(self._cycled_validation() if self.reads else None)

    def _cycled_validation(self) -> Iterator[dict]:
        while True:  # cycle: every rank runs the same number of forwards
            empty = True
            for batch in self.feed.val_pass():
                empty = False
                yield batch
            if empty:
                return


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0
