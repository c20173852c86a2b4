"""Tensor parallelism against one process: 2 gloo ranks started with torch.multiprocessing, no Ray.

Each test spawns two processes once and checks several layouts inside them, so the
suite pays for the process start-up twice. The reference is the plain GPT in the same
process, with the same weights, fed the whole global batch.

Tolerances: logits and gradients 1e-5 absolute (measured: 1.2e-7; the split changes
only the order of float sums); weights after AdamW steps 1e-4 absolute at lr 1e-3 (Adam
divides by the root of the second moment, which magnifies float noise in tiny gradients).
"""
from __future__ import annotations

import copy
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from components import checkpoint as ckpt
from components import accounting, devices, parallel, tensor_parallel
from components.model import GPT, GPTConfig, load_model
from components.config import TrainingConfig
from components.train import Hooks, to_inputs_and_targets, train

CFG = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=4, n_embd=32)
LAYOUTS = [("tp", 2), ("fsdp+tp", 2), ("tp", 1), ("fsdp+tp", 1)]  # (strategy, tp_degree) on 2 ranks
GRAD_TOL, WEIGHT_TOL = 1e-5, 1e-4


def _spawn(fn, *args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(fn, args=(os.path.join(tmp, "store"), tmp, *args), nprocs=2, join=True)


def _init(rank: int, store: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)


def _global_batches(n: int, rows: int = 8) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, CFG.vocab_size, (rows, CFG.block_size + 1), generator=g) for _ in range(n)]


def _my_rows(batch: torch.Tensor, model) -> torch.Tensor:
    """This rank's rows of a global batch: its data-parallel replica's share (a tp group shares it)."""
    replicas = parallel.data_parallel_size(model)
    layout = parallel.tensor_parallel_layout(model)
    index = layout.mesh["dp"].get_local_rank() if layout is not None else dist.get_rank()
    return batch.chunk(replicas)[index]


def _canonical(name: str, t: torch.Tensor, model) -> torch.Tensor:
    """A parameter or gradient of the split model, whole and in the plain model's row order."""
    t = t.full_tensor() if hasattr(t, "full_tensor") else t
    layout = parallel.tensor_parallel_layout(model)
    if layout is not None and name.endswith(tensor_parallel.QKV_KEYS):
        t = t[torch.argsort(tensor_parallel.qkv_rows(CFG.n_embd, layout.tp_degree))]
    return t


def _close(a: torch.Tensor, b: torch.Tensor, tol: float, what: str) -> None:
    err = (a - b).abs().max().item()
    assert err <= tol, f"{what}: max abs difference {err:.3g} > {tol}"


def _loop(max_steps: int) -> TrainingConfig:
    # A constant rate (min_lr = lr), so that a run cut at step 2 and one of 4 steps agree.
    return TrainingConfig(max_steps=max_steps, lr=1e-3, min_lr=1e-3, warmup_steps=0, weight_decay=0.1, grad_clip=0.5,
                          log_every=1, eval_every=0, checkpoint_every=0)


def _split_counts() -> int:
    """Parameters of the Linears that tp splits (all but the row-split layers' biases)."""
    C = CFG.n_embd
    per_block = (3 * C * C + 3 * C) + C * C + (4 * C * C + 4 * C) + 4 * C * C
    return CFG.n_layer * per_block


# ------------------------------------------------------- logits, gradients, steps


def _equivalence_worker(rank, store, tmp):
    _init(rank, store)
    batches = _global_batches(3)
    for strategy, tp in LAYOUTS:
        where = f"{strategy} tp_degree={tp} rank {rank}"
        torch.manual_seed(0)
        reference = GPT(CFG)
        total = sum(p.numel() for p in reference.parameters())
        model = parallel.parallelize(copy.deepcopy(reference), strategy, torch.device("cpu"), devices.FP32,
                                     tp_degree=tp)

        # One forward and backward: logits of this rank's rows, gradients of the whole batch.
        x_all, y_all = to_inputs_and_targets({"tokens": batches[0]})
        ref_logits, ref_loss = reference(x_all, y_all)
        ref_loss.backward()
        mine = _my_rows(batches[0], model)
        with parallel.gradient_sync(model, enabled=True):
            logits, loss = model(*to_inputs_and_targets({"tokens": mine}))
            loss.backward()
        start = rank * mine.size(0) if parallel.data_parallel_size(model) > 1 else 0
        _close(logits, ref_logits[start:start + mine.size(0)], GRAD_TOL, f"{where}: logits")
        for (name, p), (_, q) in zip(parallel.unwrap(model).named_parameters(), reference.named_parameters()):
            _close(_canonical(name, p.grad, model), q.grad, GRAD_TOL, f"{where}: gradient of {name}")

        # Every worker's share of the parameters, and the shares adding up to the model once.
        shares = accounting.parameter_shares(model, total)
        if rank == 0:
            assert shares["parallel/param_counts_add_up"] == 1.0, (where, shares)
            assert shares["parallel/param_count_unsharded"] == total
            if strategy == "tp" and tp == 2:  # the split Linears halved, everything else whole
                for r in (0, 1):
                    assert shares[f"parallel/worker{r}/param_count"] == total - _split_counts() // 2, (where, shares)
                    assert shares[f"parallel/worker{r}/param_bytes"] == 4 * (total - _split_counts() // 2)
            if strategy == "tp" and tp == 1:  # two replicas: worker 1 holds nothing the first does not
                assert shares["parallel/worker1/param_count"] == total
                assert shares["parallel/worker1/unique_param_count"] == 0

        # Three optimizer steps of the real loop (clipping, AdamW) against the same steps in one process.
        for p in list(model.parameters()) + list(reference.parameters()):
            p.grad = None
        losses = []
        train(model, iter([{"tokens": _my_rows(b, model)} for b in batches]), _loop(3),
              Hooks(log=lambda m, s: losses.append(m["train/loss"])))
        stepper = _Reference(reference, 3)
        ref_losses = [stepper.train_step(b) for b in batches]
        assert losses == pytest.approx(ref_losses, rel=1e-5), (where, losses, ref_losses)
        for (name, p), (_, q) in zip(parallel.unwrap(model).named_parameters(), reference.named_parameters()):
            _close(_canonical(name, p.detach(), model), q.detach(), WEIGHT_TOL, f"{where}: {name} after 3 steps")
    dist.destroy_process_group()


class _Reference:
    """The plain GPT trained step by step on whole batches, with no collective."""

    def __init__(self, model: GPT, max_steps: int):
        from components.train import make_optimizer

        self.model, self.cfg, self.step = model, _loop(max_steps), 0
        self.optimizer = make_optimizer(model, self.cfg)

    def train_step(self, batch: torch.Tensor) -> float:
        from components.train import lr_at

        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, self.cfg)
        _, loss = self.model(*to_inputs_and_targets({"tokens": batch}))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(self.model.parameters()), self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss.item()


def test_split_model_gives_the_logits_gradients_and_steps_of_one_process():
    """tp and fsdp+tp, tp_degree 2 (one group) and 1 (two replicas), on 2 gloo ranks."""
    _spawn(_equivalence_worker)


# ------------------------------------------------------------------ checkpoints


def _run(strategy: str, tp: int, start: int, stop: int, init_from: str | None, save_to: str | None, batches):
    """Train `strategy` from step `start` to `stop` (from seed 0, or a checkpoint); returns the model."""
    torch.manual_seed(0)
    model = GPT(CFG)
    if init_from:
        ckpt.load_weights(init_from, model)
    model = parallel.parallelize(model, strategy, torch.device("cpu"), devices.FP32, tp_degree=tp)
    from components.train import make_optimizer

    optimizer = make_optimizer(model, _loop(stop))
    if init_from:
        assert ckpt.restore(init_from, model, optimizer)["step"] == start

    def save(step, optimizer):
        if save_to:
            ckpt.save(save_to if dist.get_rank() == 0 else None, model, optimizer, step, {"epoch": 0, "batch": step},
                      fresh_module=lambda: GPT(CFG))
            dist.barrier()  # rank 0 writes after the collective part; the others read next

    train(model, iter([{"tokens": _my_rows(b, model)} for b in batches[start:stop]]), _loop(stop),
          Hooks(checkpoint=save if save_to else (lambda s, o: None)), optimizer=optimizer, start_step=start)
    return model


def _checkpoint_worker(rank, store, tmp):
    _init(rank, store)
    batches = _global_batches(4)
    torch.manual_seed(0)
    stepper = _Reference(GPT(CFG), 4)
    after = {}
    for step, b in enumerate(batches):
        stepper.train_step(b)
        after[step + 1] = copy.deepcopy(stepper.model.state_dict())

    def assert_like(model_or_state, step, what):
        state = model_or_state if isinstance(model_or_state, dict) else None
        if state is None:
            state = {n: _canonical(n, p.detach(), model_or_state)
                     for n, p in parallel.unwrap(model_or_state).named_parameters()}
        for name, t in state.items():
            if name in after[step]:
                _close(t, after[step][name], WEIGHT_TOL, f"{what}: {name} at step {step}")

    tp_dir, ddp_dir = os.path.join(tmp, "tp-step2"), os.path.join(tmp, "ddp-step2")
    # tp writes a full, unsharded model file: it loads as a plain GPT with the trained weights.
    _run("tp", 2, 0, 2, None, tp_dir, batches)
    plain = load_model(tp_dir)
    assert_like(dict(plain.named_parameters()), 2, "tp checkpoint loaded as a plain GPT")
    # ... and a ddp run resumes from it (weights and AdamW moments) as if it had never stopped.
    assert_like(_run("ddp", 1, 2, 4, tp_dir, None, batches), 4, "ddp resumed from a tp checkpoint")
    # The other way: a ddp checkpoint resumes under tp.
    _run("ddp", 1, 0, 2, None, ddp_dir, batches)
    assert_like(_run("tp", 2, 2, 4, ddp_dir, None, batches), 4, "tp resumed from a ddp checkpoint")
    # And fsdp+tp reads and writes the same files.
    assert_like(_run("fsdp+tp", 2, 2, 4, tp_dir, None, batches), 4, "fsdp+tp resumed from a tp checkpoint")
    dist.destroy_process_group()


def test_checkpoints_cross_load_between_tp_and_ddp():
    _spawn(_checkpoint_worker)


# -------------------------------------------------------------- pure functions


def test_qkv_rows_give_each_rank_its_own_heads():
    C, tp = 8, 2
    rows = tensor_parallel.qkv_rows(C, tp)
    chunks = rows.chunk(tp)  # what ColwiseParallel hands each rank
    assert chunks[0].tolist() == [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19]  # q, k, v of heads 0..(C/2)
    assert chunks[1].tolist() == [4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23]
    assert torch.equal(rows[torch.argsort(rows)], torch.arange(3 * C))


# ------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("compile", [False, True])
def test_tp_degree_1_on_one_gpu_runs_and_gives_the_ddp_losses(tmp_path, compile):
    """The tp code path on a one-GPU machine (nccl, a 1 x 1 mesh): same losses as ddp."""
    device = torch.device("cuda", 0)
    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        losses = {}
        for strategy in ("ddp", "tp"):
            torch.manual_seed(0)
            model = parallel.parallelize(GPT(CFG), strategy, device, devices.FP32, compile=compile, tp_degree=1)
            losses[strategy] = []
            train(model, iter([{"tokens": b} for b in _global_batches(4)]), _loop(4),
                  Hooks(log=lambda m, s, out=losses[strategy]: out.append(m["train/loss"])), device)
        assert losses["tp"] == pytest.approx(losses["ddp"], rel=1e-4)
    finally:
        dist.destroy_process_group()
