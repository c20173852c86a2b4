"""The training recipe without Ray: in one process, and on 2 gloo ranks started with torch.multiprocessing.

The runtime here is a few lines: rows held in memory as the feed, and a report hook that
copies each checkpoint into a folder, as Ray Train copies it into its storage.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from components import checkpoint as ckpt
from components.config import FinetuneConfig, PretrainConfig
from components.finetune import LoRALinear
from components.model import GPT, GPTConfig, load_model, save_model
from components.recipe import Feed, RunHooks, TrainPlan, run

MODEL = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=4, n_embd=32)


def _rows(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.integers(0, MODEL.vocab_size, size=(n, 1)) + np.arange(MODEL.block_size + 1)) % MODEL.vocab_size


def _feed(rows: np.ndarray, batch_size: int, val: np.ndarray | None = None, mask: bool = False) -> Feed:
    """Batches of `rows` in a seeded order per epoch, as a runtime's shard delivers them."""
    def train_epoch(epoch: int, seed: int):
        order = np.random.default_rng(seed).permutation(len(rows))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            batch = {"tokens": rows[order[start:start + batch_size]]}
            if mask:  # train on the second half of each row only, as fine-tune pairs do
                batch["mask"] = (np.arange(rows.shape[1]) >= rows.shape[1] // 2).astype(np.int64)[None].repeat(
                    batch_size, 0)
            yield batch

    val_pass = (lambda: ({"tokens": val[i:i + batch_size]} for i in range(0, len(val), batch_size))) \
        if val is not None else None
    return Feed(train_epoch, val_pass)


class _Runtime:
    """Records what the recipe reports, and keeps each checkpoint in `store` as Ray Train would."""

    def __init__(self, store: str, crash_at: int | None = None):
        self.store, self.crash_at = store, crash_at
        self.logs, self.params, self.started, self.reports = {}, {}, [], []

    def hooks(self) -> RunHooks:
        return RunHooks(log=self._log, log_params=self.params.update, started=self.started.append, report=self._report)

    def _log(self, metrics: dict, step: int | None) -> None:
        self.logs.setdefault(step, {}).update(metrics)

    def _report(self, metrics: dict, folder: str | None) -> None:
        self.reports.append(metrics["step"])
        if folder is not None:
            shutil.copytree(folder, os.path.join(self.store, f"checkpoint_{metrics['step']:06d}"))
        if metrics["step"] == self.crash_at:
            raise RuntimeError("worker died")  # after the checkpoint was kept: the run continues from it

    def checkpoints(self) -> list[str]:
        return [str(p) for p in ckpt.find_under(self.store)]


def _pretrain(max_steps: int = 8, **overrides) -> PretrainConfig:
    settings = dict(max_steps=max_steps, batch_size=4, lr=1e-2, min_lr=1e-3, warmup_steps=2, weight_decay=0.1,
                    log_every=2, eval_every=4, eval_batches=2, checkpoint_every=4, seed=0, precision="fp32")
    return PretrainConfig(**{**settings, **overrides})


def _weights(folder: str) -> dict:
    return {k: v.clone() for k, v in load_model(folder).state_dict().items()}


def _assert_same_weights(a: dict, b: dict, tol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for name in a:
        err = (a[name] - b[name]).abs().max().item()
        assert err <= tol, f"{name}: max abs difference {err:.3g} > {tol}"


# ------------------------------------------------------------------ one process


def test_recipe_trains_logs_and_reports_complete_checkpoints(tmp_path):
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text("{}")
    runtime = _Runtime(str(tmp_path / "store"))
    plan = TrainPlan(_pretrain(), MODEL, extra_files=(str(tokenizer),))
    last = run(plan, _feed(_rows(64, 0), 4, val=_rows(16, 1)), runtime.hooks(), torch.device("cpu"))

    assert runtime.started == [None]  # a fresh start
    assert runtime.reports == [4, 8]  # checkpoint_every 4, and the last step
    assert runtime.params["trainable.total"] == sum(p.numel() for p in GPT(MODEL).parameters())
    assert runtime.logs[None]["parallel/param_counts_add_up"] == 1.0  # the shares, logged once
    assert sorted(s for s in runtime.logs if s is not None) == [2, 4, 6, 8]
    assert "val/loss" in runtime.logs[4] and "val/loss" in runtime.logs[8]
    assert last["train/step"] == 8
    assert runtime.logs[8]["train/loss"] < runtime.logs[2]["train/loss"]  # the rows count upward: learnable
    newest = ckpt.newest(runtime.checkpoints())
    assert newest[1] == 8
    assert (Path(newest[0]) / "tokenizer.json").read_text() == "{}"  # a complete model folder
    assert load_model(newest[0]).config == MODEL


def test_recipe_resumes_after_a_crash_as_if_it_never_stopped(tmp_path):
    feed = _feed(_rows(40, 0), 4)  # 10 batches an epoch: the run crosses an epoch boundary after the crash
    plan = TrainPlan(_pretrain(max_steps=12, eval_every=0), MODEL)
    whole = _Runtime(str(tmp_path / "whole"))
    run(plan, feed, whole.hooks(), torch.device("cpu"))

    crashed = _Runtime(str(tmp_path / "crashed"), crash_at=4)
    with pytest.raises(RuntimeError, match="worker died"):
        run(plan, feed, crashed.hooks(), torch.device("cpu"))
    again = _Runtime(crashed.store)
    run(plan, feed, again.hooks(), torch.device("cpu"), again.checkpoints())

    assert again.started == [4]
    assert sorted(s for s in again.logs if s is not None) == [6, 8, 10, 12]  # steps 5..12 only
    assert again.logs[12]["train/loss"] == whole.logs[12]["train/loss"]
    _assert_same_weights(_weights(ckpt.newest(again.checkpoints())[0]),
                         _weights(ckpt.newest(whole.checkpoints())[0]))


def test_recipe_trains_lora_adapters_only_and_saves_them_merged(tmp_path):
    torch.manual_seed(3)
    base = GPT(MODEL)
    save_model(base, str(tmp_path / "base"))
    before = {k: v.clone() for k, v in base.state_dict().items()}
    finetune = FinetuneConfig(max_steps=6, batch_size=4, lr=1e-2, warmup_steps=0, log_every=2, eval_every=0,
                              checkpoint_every=3, seed=0, precision="fp32", method="lora", lora_rank=2, lora_alpha=4.0)
    plan = TrainPlan(finetune, MODEL, init_from=str(tmp_path / "base"))
    assert plan.lora is finetune
    feed = _feed(_rows(32, 2), 4, mask=True)

    crashed = _Runtime(str(tmp_path / "store"), crash_at=3)
    with pytest.raises(RuntimeError):
        run(plan, feed, crashed.hooks(), torch.device("cpu"))
    blocks, adapted = MODEL.n_layer, [(3 * 32, 32), (32, 32), (4 * 32, 32), (32, 4 * 32)]  # (out, in) per target
    assert crashed.params["trainable.trainable"] == blocks * sum(2 * (o + i) for o, i in adapted)  # rank 2
    again = _Runtime(crashed.store)
    run(plan, feed, again.hooks(), torch.device("cpu"), again.checkpoints())
    whole = _Runtime(str(tmp_path / "whole"))
    run(plan, feed, whole.hooks(), torch.device("cpu"))

    final = load_model(ckpt.newest(again.checkpoints())[0])  # a plain GPT: the adapters merged in
    assert not any(isinstance(m, LoRALinear) for m in final.modules())
    after = final.state_dict()
    assert not torch.equal(after["transformer.h.0.attn.c_attn.weight"], before["transformer.h.0.attn.c_attn.weight"])
    assert torch.equal(after["transformer.wte.weight"], before["transformer.wte.weight"])  # frozen: not adapted
    _assert_same_weights(_weights(ckpt.newest(again.checkpoints())[0]),
                         _weights(ckpt.newest(whole.checkpoints())[0]))


# ------------------------------------------------------------------ 2 gloo ranks


def _spawn(fn, results: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(fn, args=(os.path.join(tmp, "store"), tmp, str(results)), nprocs=2, join=True)


def _ranks_worker(rank: int, store: str, tmp: str, results: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    rows, val = _rows(64, 0), _rows(16, 1)
    feeds = {
        "ddp": _feed(rows[rank::2], 4, val=val[rank::2]),  # each rank its own half
        # A tp group shares one shard: only its first rank may read it.
        "tp": _feed(rows, 4, val=val) if rank == 0 else Feed(_never_read, _never_read),
    }
    for strategy, tp_degree in (("ddp", 1), ("tp", 2)):
        plan = TrainPlan(_pretrain(strategy=strategy, tp_degree=tp_degree), MODEL)
        where = os.path.join(tmp, strategy)
        whole = _Runtime(os.path.join(where, "whole"))
        run(plan, feeds[strategy], whole.hooks(), torch.device("cpu"))
        crashed = _Runtime(os.path.join(where, "crashed"), crash_at=4)
        try:
            run(plan, feeds[strategy], crashed.hooks(), torch.device("cpu"))
            raise AssertionError("the crash hook did not stop the run")
        except RuntimeError as error:
            assert "worker died" in str(error), error
        dist.barrier()  # rank 0 has kept the checkpoint before any rank looks for it
        again = _Runtime(crashed.store)
        run(plan, feeds[strategy], again.hooks(), torch.device("cpu"), again.checkpoints())
        assert again.started == [4], (strategy, again.started)
        assert again.logs[8]["train/loss"] == pytest.approx(whole.logs[8]["train/loss"], rel=1e-6), strategy
        if rank == 0:
            _assert_same_weights(_weights(ckpt.newest(again.checkpoints())[0]),
                                 _weights(ckpt.newest(whole.checkpoints())[0]), tol=1e-6)
            assert whole.logs[None]["parallel/param_counts_add_up"] == 1.0
            losses = {s: m["train/loss"] for s, m in whole.logs.items() if s is not None}
            Path(results, f"{strategy}.json").write_text(json.dumps(losses))
        dist.barrier()
    dist.destroy_process_group()


def _never_read(*args):
    raise AssertionError("a tensor-parallel rank other than the group's first read the data")


def test_recipe_resumes_under_ddp_and_tp_on_two_ranks(tmp_path):
    """Resume on 2 gloo ranks (ddp, and tp with one group of 2); tp trains the rows one process trains."""
    _spawn(_ranks_worker, tmp_path)
    single = _Runtime(str(tmp_path / "single"))
    run(TrainPlan(_pretrain(), MODEL), _feed(_rows(64, 0), 4, val=_rows(16, 1)), single.hooks(), torch.device("cpu"))
    tp = {int(s): loss for s, loss in json.loads((tmp_path / "tp.json").read_text()).items()}
    assert tp == pytest.approx({s: m["train/loss"] for s, m in single.logs.items() if s is not None}, rel=1e-4)
