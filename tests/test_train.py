"""The shared training loop and LoRA, in one plain process (no Ray)."""
import dataclasses
import math

import numpy as np
import pytest
import torch

from components.finetune import LoRALinear, apply_lora, merge_lora
from components.accounting import parameter_counts
from components.model import GPT, IGNORE_INDEX
from components.config import TrainingConfig
from components.train import Hooks, lr_at, repeat, to_inputs_and_targets, train


@pytest.fixture
def config(tiny_config):
    """The tiny shape at width 32: the golden loss, the LoRA counts and the loss drops below are measured on it."""
    return dataclasses.replace(tiny_config, n_embd=32)


def _tiny_model(config, seed=0):
    torch.manual_seed(seed)
    return GPT(config)


def _batches(vocab=64, block=16, batch=8, seed=0):
    rng = np.random.default_rng(seed)
    # A learnable pattern: each row counts upward from a random start (mod vocab).
    starts = rng.integers(0, vocab, size=(64, 1))
    rows = (starts + np.arange(block + 1)) % vocab
    return repeat(lambda epoch: ({"tokens": rows[i:i + batch]} for i in range(0, len(rows), batch)))


def _training(**settings) -> TrainingConfig:
    """A training section that neither validates nor checkpoints unless asked (the loop's hooks decide)."""
    return TrainingConfig(**{"eval_every": 0, "checkpoint_every": 0, **settings})


def _loop(steps=40):
    return _training(max_steps=steps, lr=1e-2, min_lr=1e-3, warmup_steps=5, weight_decay=0.0, grad_clip=1.0,
                     log_every=10)


def test_lr_schedule_warms_up_then_decays_to_min():
    cfg = _loop(100)
    assert lr_at(0, cfg) == pytest.approx(cfg.lr / 5)
    assert lr_at(4, cfg) == pytest.approx(cfg.lr)
    assert lr_at(99, cfg) == pytest.approx(cfg.min_lr, rel=0.01)


def test_mask_turns_prompt_tokens_into_ignored_targets():
    batch = {"tokens": np.array([[5, 6, 7, 8]]), "mask": np.array([[0, 0, 1, 1]])}
    x, y = to_inputs_and_targets(batch)
    assert x.tolist() == [[5, 6, 7]]
    assert y.tolist() == [[IGNORE_INDEX, 7, 8]]


def test_seeded_golden_loss(config):
    """A fixed seed gives the same loss curve: a change in the model, init or loop shows up here."""
    model = _tiny_model(config)
    reports, saved = [], []
    final = train(model, _batches(), _loop(), Hooks(log=lambda m, step: reports.append(m),
                                                    checkpoint=lambda step, opt: saved.append(step)))
    assert [m["train/step"] for m in reports] == [10, 20, 30, 40]
    assert saved == [40]  # checkpoint_every 0: only the last step checkpoints
    first, last = reports[0]["train/loss"], final["train/loss"]
    assert first < math.log(64) + 0.3
    assert last < 1.0 < first  # the counting pattern is learnt
    assert last == pytest.approx(0.5444, abs=0.02)  # measured on torch 2.13 CPU (3.582 at step 10)


def test_lora_trains_only_adapters_and_merges_exactly(config):
    model = _tiny_model(config)
    total = parameter_counts(model)["total"]
    apply_lora(model, rank=4, alpha=8)
    counts = parameter_counts(model)
    # 4 wrapped Linears per block: (in + out) * r each
    expected = 2 * 4 * ((32 + 96) + (32 + 32) + (32 + 128) + (128 + 32))
    assert counts["trainable"] == expected
    assert counts["total"] == total + expected
    train(model, _batches(), _loop(10), Hooks())
    x = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        wrapped, _ = model(x)
    merged = merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    with torch.no_grad():
        plain, _ = merged(x)
    assert torch.allclose(wrapped, plain, atol=1e-5)
    assert parameter_counts(merged)["total"] == total


# ------------------------------------------------------------ the GPU-speed loop, on CPU

def _rows(n=32, vocab=64, block=16, seed=0):
    rng = np.random.default_rng(seed)
    rows = (rng.integers(0, vocab, size=(n, 1)) + np.arange(block + 1)) % vocab
    # a mask with a different number of trained tokens per row, as fine-tuning pairs have
    mask = (np.arange(block + 1)[None, :] >= rng.integers(1, block // 2, size=(n, 1))).astype(np.int8)
    return rows, mask


def _fixed_batches(rows, mask, batch):
    return repeat(lambda epoch: ({"tokens": rows[i:i + batch], "mask": mask[i:i + batch]}
                                 for i in range(0, len(rows), batch)))


def test_accumulating_four_quarter_batches_equals_one_full_batch(config):
    rows, mask = _rows()
    cfg = dict(max_steps=3, lr=1e-2, min_lr=1e-3, warmup_steps=0, weight_decay=0.1, grad_clip=1.0, log_every=1)
    whole, accumulated = _tiny_model(config), _tiny_model(config)
    losses = {"whole": [], "acc": []}
    train(whole, _fixed_batches(rows, mask, 8), _training(**cfg),
          Hooks(log=lambda m, s: losses["whole"].append(m["train/loss"])))
    train(accumulated, _fixed_batches(rows, mask, 2), _training(**cfg),
          Hooks(log=lambda m, s: losses["acc"].append(m["train/loss"])), grad_accum=4)
    # Only the float summation order differs. Adam divides by sqrt(v), which magnifies the
    # rounding of near-zero gradients, so the weights agree to 0.5% of one step (lr 1e-2), not to 1e-7;
    # a wrong weighting of the micro-batches (e.g. a plain mean of their means) is off by far more.
    assert losses["acc"] == pytest.approx(losses["whole"], rel=1e-5)
    for (name, a), (_, b) in zip(whole.named_parameters(), accumulated.named_parameters()):
        assert torch.allclose(a, b, atol=5e-5), name


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_low_precision_autocast_on_cpu_lowers_the_loss(name, config):
    from components.devices import resolve_precision

    model = _tiny_model(config)
    logs = []
    train(model, _batches(), _loop(30), Hooks(log=lambda m, s: logs.append(m["train/loss"])),
          precision=resolve_precision(name, torch.device("cpu")))
    assert all(math.isfinite(v) for v in logs)
    assert logs[-1] < logs[0] - 1.0
    assert next(model.parameters()).dtype == torch.float32  # weights stay fp32 under autocast


def test_validation_loss_is_logged_every_eval_every_steps(tiny_model):
    from components.train import validation_loss

    model = tiny_model
    rows, _ = _rows()
    logs = []
    validate = lambda: validation_loss(model, ({"tokens": rows[i:i + 8]} for i in range(0, 32, 8)), 2)
    train(model, _batches(), dataclasses.replace(_loop(20), eval_every=10, log_every=5),
          Hooks(log=lambda m, s: logs.append(m), validate=validate))
    assert [m["train/step"] for m in logs if "val/loss" in m] == [10, 20]
    assert all(math.isfinite(m["val/loss"]) for m in logs if "val/loss" in m)
    assert model.training  # back in training mode after each validation


def test_resuming_from_a_checkpoint_continues_exactly(tmp_path, config):
    """Model, optimizer, step, RNG and data position restored: the resumed run ends where the uninterrupted one does."""
    from components import checkpoint
    from components.train import Batches, make_optimizer

    rows, mask = _rows(n=24)  # 3 batches an epoch: the checkpoint at step 4 falls inside epoch 1
    make_epoch = lambda epoch: ({"tokens": rows[i:i + 8], "mask": mask[i:i + 8]} for i in range(0, 24, 8))
    cfg = _training(max_steps=8, lr=1e-2, min_lr=1e-3, warmup_steps=2, weight_decay=0.1, grad_clip=1.0,
                    log_every=1, checkpoint_every=4)
    model_cfg = dataclasses.replace(config, dropout=0.1)

    def run(model, batches, optimizer=None, start_step=0):
        def save(step, opt):
            folder = str(tmp_path / f"step{step}")
            checkpoint.save(folder, model, opt, step, batches.position(), lambda: GPT(model_cfg))
        train(model, batches, cfg, Hooks(checkpoint=save), optimizer=optimizer, start_step=start_step)

    torch.manual_seed(0)
    straight = GPT(model_cfg)  # dropout on: the RNG state matters
    run(straight, Batches(make_epoch))

    torch.manual_seed(123)  # a different fresh start: everything must come from the checkpoint
    resumed = GPT(model_cfg)
    folder = str(tmp_path / "step4")
    assert checkpoint.step_of(folder) == 4
    checkpoint.load_weights(folder, resumed)
    optimizer = make_optimizer(resumed, cfg)
    state = checkpoint.restore(folder, resumed, optimizer)
    assert state == {"step": 4, "data": {"epoch": 1, "batch": 1}}
    batches = Batches(make_epoch, state["data"])
    run(resumed, batches, optimizer, start_step=state["step"])
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_an_incomplete_checkpoint_folder_is_not_used(tmp_path, tiny_model):
    from components import checkpoint

    model = tiny_model
    optimizer = torch.optim.AdamW(model.parameters())
    for step in (5, 10):
        checkpoint.save(str(tmp_path / f"c{step}"), model, optimizer, step, {"epoch": 0, "batch": step},
                        lambda: GPT(model.config))
    assert checkpoint.newest(checkpoint.find_under(tmp_path)) == (str(tmp_path / "c10"), 10)
    weights = tmp_path / "c10" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a copy cut short
    assert checkpoint.step_of(tmp_path / "c10") is None
    assert checkpoint.newest(checkpoint.find_under(tmp_path)) == (str(tmp_path / "c5"), 5)


@pytest.mark.slow
def test_compiled_model_trains_like_the_eager_one(config):
    """torch.compile on the CPU (slow: the first steps compile for tens of seconds)."""
    from components.devices import FP32
    from components.parallel import parallelize

    eager = _tiny_model(config)
    compiled = parallelize(_tiny_model(config), "ddp", torch.device("cpu"), FP32, compile=True)
    logs = {"eager": [], "compiled": []}
    for name, model in (("eager", eager), ("compiled", compiled)):
        train(model, _batches(), _loop(20), Hooks(log=lambda m, s, name=name: logs[name].append(m["train/loss"])))
    assert logs["compiled"] == pytest.approx(logs["eager"], rel=1e-3)


def test_the_share_of_time_spent_waiting_for_data_is_logged(config):
    import time

    def slow(batches, seconds):
        for batch in batches:
            time.sleep(seconds)  # a feed that cannot keep up
            yield batch

    def waiting(batches):
        logs = []
        train(_tiny_model(config), batches, _loop(10), Hooks(log=lambda m, s: logs.append(m["train/data_wait_frac"])))
        return logs[-1]

    # The tiny step takes a few milliseconds: 50 ms per batch is most of the window.
    assert waiting(slow(_batches(), 0.05)) > 0.5
    assert waiting(_batches()) < 0.2
