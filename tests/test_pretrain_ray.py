"""Pretraining strategies, checkpoints and worker recovery on Ray Train: 2 gloo workers, real MLflow.

These call `pipelines.ray_runtime.fit` directly (no data stage) on a small learnable
data set, so each takes tens of seconds on 2 cores.
"""
import dataclasses
import math
import os
import signal
import threading
import time

import pytest
from mlflow import MlflowClient

from components.config import FinetuneConfig, PretrainConfig
from components.model import GPTConfig
from components.recipe import TrainPlan
from pipelines import ray_runtime
from pipelines.tracking import Tracker
from tests.helpers import BLOCK, VOCAB, write_rows

pytestmark = pytest.mark.integration


@pytest.fixture
def setup(tmp_path, ray_cluster):
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "ray-train-tests", artifact_location=str(tmp_path / "art"))
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text("{}")  # copied into checkpoints as it is; these tests never tokenize
    return {
        "tmp": tmp_path, "tracker": tracker, "tokenizer": str(tokenizer),
        "train": write_rows(tmp_path / "train.parquet", 512, 0), "val": write_rows(tmp_path / "val.parquet", 64, 1),
    }


def _plan(setup, strategy="ddp", max_steps=20, checkpoint_every=10, **training) -> TrainPlan:
    section = PretrainConfig(**{**dict(
        max_steps=max_steps, lr=1e-2, min_lr=1e-3, warmup_steps=2, weight_decay=0.0, grad_clip=1.0, log_every=2,
        eval_every=10, checkpoint_every=checkpoint_every, batch_size=8, seed=0, num_workers=2, max_failures=0,
        strategy=strategy, precision="fp32"), **training})
    model = GPTConfig(block_size=BLOCK, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32)
    return TrainPlan(section, model, extra_files=(setup["tokenizer"],))


def _fit(setup, plan: TrainPlan, logger, name: str | None = None):
    return ray_runtime.fit(plan, name or f"test-{logger.run_id}", setup["train"], setup["val"],
                           str(setup["tmp"] / "ray"), logger)


def _history(setup, run_id, key):
    return [(m.step, m.value) for m in MlflowClient(setup["tracker"].tracking_uri).get_metric_history(run_id, key)]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_each_strategy_lowers_the_loss_and_writes_a_full_checkpoint(setup, strategy):
    from components.model import load_model

    with setup["tracker"].run(f"pretrain-{strategy}") as log:
        result = _fit(setup, _plan(setup, strategy), log)
    losses = [v for _, v in sorted(_history(setup, log.run_id, "train/loss"))]
    assert losses[-1] < losses[0] - 1.0, losses
    assert [s for s, _ in _history(setup, log.run_id, "val/loss")] == [10, 20]
    assert result.metrics["step"] == 20
    # Each worker's share of the parameters is logged, and the shares add up (replicas counted once).
    metrics = MlflowClient(setup["tracker"].tracking_uri).get_run(log.run_id).data.metrics
    assert metrics["parallel/param_counts_add_up"] == 1.0
    held = [metrics[f"parallel/worker{r}/param_count"] for r in (0, 1)]
    unsharded = metrics["parallel/param_count_unsharded"]
    assert held == [unsharded, unsharded] if strategy == "ddp" else sum(held) == unsharded
    # The final checkpoint is a full, unsharded model folder that loads without the training code.
    model = load_model(result.checkpoint)
    assert model.transformer.wte.weight.shape == (VOCAB, 32)
    assert sorted(os.listdir(result.checkpoint)) == [
        "checkpoint.json", "config.json", "model.safetensors", "tokenizer.json", "trainer_state.pt"]


# Slow (minutes on 2 cores): kept out of the default suite so CI stays near 15 minutes.
@pytest.mark.slow
def test_a_worker_killed_mid_run_is_replaced_and_training_continues(setup):
    """SIGKILL one worker after a checkpoint: Ray Train restarts the group, which continues from the
    newest checkpoint (at most one checkpoint interval lost), logging into the same MLflow run."""
    tracker, client = setup["tracker"], MlflowClient(setup["tracker"].tracking_uri)
    with tracker.run("pretrain-killed") as log:
        plan = _plan(setup, max_steps=60, checkpoint_every=10, max_failures=1)
        killed = {}

        def kill_a_worker_after_step_25():
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                run = client.get_run(log.run_id)
                if run.data.metrics.get("train/step", 0) >= 25 and "train.worker_pids" in run.data.tags:
                    pid = int(run.data.tags["train.worker_pids"].split(",")[1])  # rank 1
                    killed["step"] = run.data.metrics["train/step"]
                    os.kill(pid, signal.SIGKILL)
                    return
                time.sleep(0.2)

        killer = threading.Thread(target=kill_a_worker_after_step_25)
        killer.start()
        result = _fit(setup, plan, log)
        killer.join()
    assert "step" in killed, "the worker was never killed"
    run = client.get_run(log.run_id)
    assert run.info.status == "FINISHED"
    resumed = _history(setup, log.run_id, "train/resumed_from_step")
    assert len(resumed) == 1
    resumed_from = resumed[0][1]
    assert resumed_from % 10 == 0 and killed["step"] - 10 <= resumed_from + 10  # at most one interval lost
    assert result.metrics["step"] == 60
    steps = [s for s, _ in _history(setup, log.run_id, "train/step")]
    assert max(steps) == 60
    assert all(math.isfinite(v) for _, v in _history(setup, log.run_id, "train/loss"))


# Slow (minutes on 2 cores): kept out of the default suite so CI stays near 15 minutes.
@pytest.mark.slow
def test_lora_fine_tuning_under_fsdp_saves_a_merged_plain_model(setup):
    """Fine-tuning shares the loop and its options: LoRA adapters on a sharded model, merged at the end."""
    import torch

    from components.finetune import LoRALinear
    from components.model import GPT, load_model, save_model

    torch.manual_seed(0)
    base = GPT(GPTConfig(block_size=BLOCK, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32))
    save_model(base, str(setup["tmp"] / "base"))
    with setup["tracker"].run("finetune-fsdp-lora") as log:
        pretrained = _plan(setup, "fsdp", max_steps=10, checkpoint_every=5)
        section = FinetuneConfig(**{**dataclasses.asdict(pretrained.training), "method": "lora", "lora_rank": 4,
                                    "lora_alpha": 8.0})
        plan = TrainPlan(section, pretrained.model, init_from=str(setup["tmp"] / "base"),
                         extra_files=pretrained.extra_files)
        result = _fit(setup, plan, log)
    losses = [v for _, v in sorted(_history(setup, log.run_id, "train/loss"))]
    assert losses[-1] < losses[0]
    tuned = load_model(result.checkpoint)  # a plain GPT: the adapters are merged into its weights
    assert not any(isinstance(m, LoRALinear) for m in tuned.modules())
    changed = [n for n, p in tuned.named_parameters() if not torch.equal(p, dict(base.named_parameters())[n])]
    assert changed and all(".h." in n and n.endswith(".weight") for n in changed)  # only the adapted Linears


def _niceness() -> int:
    return os.nice(0)


def test_ray_workers_run_at_the_drivers_priority(ray_cluster):
    # Ray's default puts workers at nice 15, where any other busy process slows training
    # (pipelines/ray_runtime.py): the Ray the project starts keeps them level with the driver.
    assert ray_runtime.run_task(_niceness) == os.nice(0)
