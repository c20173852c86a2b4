"""Tensor parallelism on Ray Train: 2 gloo workers, Ray Data feeding a tp group, real MLflow.

The default test trains `tp` on two workers (one tp group, so one data shard) and `ddp`
on one worker with the same batch size and seed: both read the same rows in the same
order, so their losses must agree to float noise, not just trend alike.
"""
import pytest
import torch
from mlflow import MlflowClient

from components.config import PretrainConfig
from components.model import GPT, GPTConfig, load_model
from components.recipe import TrainPlan
from pipelines import ray_runtime
from pipelines.tracking import Tracker
from tests.helpers import BLOCK, VOCAB, write_rows

pytestmark = pytest.mark.integration

MODEL = GPTConfig(block_size=BLOCK, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture
def setup(tmp_path, ray_cluster):
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text("{}")
    return {
        "tmp": tmp_path, "tokenizer": str(tokenizer),
        "tracker": Tracker(f"sqlite:///{tmp_path}/mlflow.db", "tp-tests", artifact_location=str(tmp_path / "art")),
        "train": write_rows(tmp_path / "train.parquet", 512, 0), "val": write_rows(tmp_path / "val.parquet", 64, 1),
    }


def _fit(setup, logger, strategy, tp_degree=1, num_workers=2, max_steps=16, name=None):
    section = PretrainConfig(max_steps=max_steps, lr=1e-2, min_lr=1e-3, warmup_steps=2, weight_decay=0.0,
                             grad_clip=1.0, log_every=1, eval_every=8, checkpoint_every=8, batch_size=8, seed=0,
                             num_workers=num_workers, max_failures=0, strategy=strategy, tp_degree=tp_degree,
                             precision="fp32")
    plan = TrainPlan(section, MODEL, extra_files=(setup["tokenizer"],))
    return ray_runtime.fit(plan, name or f"test-{logger.run_id}", setup["train"], setup["val"],
                           str(setup["tmp"] / "ray"), logger)


def _history(setup, run_id, key):
    client = MlflowClient(setup["tracker"].tracking_uri)
    return [v for _, v in sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))]


def test_tp_on_two_workers_tracks_ddp_and_logs_each_workers_share(setup):
    runs = {}
    for strategy, tp, workers in (("tp", 2, 2), ("ddp", 1, 1)):
        with setup["tracker"].run(f"pretrain-{strategy}") as log:
            result = _fit(setup, log, strategy, tp, num_workers=workers)
        runs[strategy] = (log.run_id, result)
    tp_losses = _history(setup, runs["tp"][0], "train/loss")
    ddp_losses = _history(setup, runs["ddp"][0], "train/loss")
    assert len(tp_losses) == len(ddp_losses) == 16
    assert tp_losses[-1] < tp_losses[0] - 1.0, tp_losses  # it learns
    assert tp_losses == pytest.approx(ddp_losses, rel=1e-3), (tp_losses, ddp_losses)
    assert _history(setup, runs["tp"][0], "val/loss") == pytest.approx(
        _history(setup, runs["ddp"][0], "val/loss"), rel=1e-3)

    # Each worker holds the whole embeddings and layer norms and half of every split Linear.
    metrics = MlflowClient(setup["tracker"].tracking_uri).get_run(runs["tp"][0]).data.metrics
    total = sum(p.numel() for p in GPT(MODEL).parameters())
    assert metrics["parallel/param_count_unsharded"] == total
    assert metrics["parallel/param_counts_add_up"] == 1.0
    for rank in (0, 1):
        assert total / 2 < metrics[f"parallel/worker{rank}/param_count"] < total
        assert metrics[f"parallel/worker{rank}/param_bytes"] == 4 * metrics[f"parallel/worker{rank}/param_count"]
    assert metrics["parallel/worker0/param_count"] + metrics["parallel/worker1/unique_param_count"] == total

    # The tp checkpoint is a plain model file: it loads alone and predicts like the ddp one.
    x = torch.randint(0, VOCAB, (2, BLOCK))
    tp_model, ddp_model = load_model(runs["tp"][1].checkpoint), load_model(runs["ddp"][1].checkpoint)
    assert torch.allclose(tp_model(x)[0], ddp_model(x)[0], atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("first, then", [("ddp", "tp"), ("tp", "fsdp+tp")])
def test_a_run_continues_under_another_strategy(setup, first, then):
    """The same Ray Train run name continues from its newest checkpoint, whatever strategy wrote it."""
    name = f"switch-{first}-{then}".replace("+", "")
    with setup["tracker"].run(f"{first}-then-{then}") as log:
        _fit(setup, log, first, 1 if first == "ddp" else 2, max_steps=8, name=name)
        result = _fit(setup, log, then, 2, max_steps=16, name=name)
    assert result.metrics["step"] == 16
    assert _history(setup, log.run_id, "train/resumed_from_step") == [8]
    losses = _history(setup, log.run_id, "train/loss")
    assert losses[-1] < losses[0] - 1.0, losses
    load_model(result.checkpoint)
