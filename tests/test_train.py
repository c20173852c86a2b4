"""The shared training loop and LoRA, in one plain process (no Ray)."""
import math

import numpy as np
import pytest
import torch

from components.finetune import LoRALinear, apply_lora, merge_lora
from components.model import GPT, GPTConfig, parameter_counts
from components.train import IGNORE_INDEX, LoopConfig, lr_at, repeat, to_inputs_and_targets, train


def _batches(vocab=64, block=16, batch=8, seed=0):
    rng = np.random.default_rng(seed)
    # A learnable pattern: each row counts upward from a random start (mod vocab).
    starts = rng.integers(0, vocab, size=(64, 1))
    rows = (starts + np.arange(block + 1)) % vocab
    return repeat(lambda epoch: ({"tokens": rows[i:i + batch]} for i in range(0, len(rows), batch)))


def _loop(steps=40):
    return LoopConfig(max_steps=steps, lr=1e-2, min_lr=1e-3, warmup_steps=5, weight_decay=0.0, grad_clip=1.0,
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


def test_seeded_golden_loss():
    """A fixed seed gives the same loss curve: a change in the model, init or loop shows up here."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32))
    reports, saved = [], []
    final = train(model, _batches(), _loop(), lambda m, ckpt: reports.append((m, ckpt)),
                  lambda step: saved.append(step) or f"ckpt-{step}")
    assert [m["train/step"] for m, _ in reports] == [10, 20, 30, 40]
    assert reports[-1][1] == "ckpt-40" and saved == [40]  # checkpoint only with the last report
    first, last = reports[0][0]["train/loss"], final["train/loss"]
    assert first < math.log(64) + 0.3
    assert last < 1.0 < first  # the counting pattern is learnt
    assert last == pytest.approx(0.5444, abs=0.02)  # measured on torch 2.13 CPU (3.582 at step 10)


def test_lora_trains_only_adapters_and_merges_exactly():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32))
    total = parameter_counts(model)["total"]
    apply_lora(model, rank=4, alpha=8)
    counts = parameter_counts(model)
    # 4 wrapped Linears per block: (in + out) * r each
    expected = 2 * 4 * ((32 + 96) + (32 + 32) + (32 + 128) + (128 + 32))
    assert counts["trainable"] == expected
    assert counts["total"] == total + expected
    train(model, _batches(), _loop(10), lambda m, c: None, lambda step: None)
    x = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        wrapped, _ = model(x)
    merged = merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    with torch.no_grad():
        plain, _ = merged(x)
    assert torch.allclose(wrapped, plain, atol=1e-5)
    assert parameter_counts(merged)["total"] == total
