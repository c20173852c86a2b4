import json
import math

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

from components.model import (
    GPT,
    PRESETS,
    GPTConfig,
    config_from_preset,
    flops_per_token,
    load_model,
    save_model,
)

TINY = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=16)


@pytest.fixture
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(TINY).eval()


def test_forward_shapes(model):
    idx = torch.randint(0, 64, (3, 10))
    logits, loss = model(idx)
    assert logits.shape == (3, 10, 64)
    assert loss is None
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 10, 64)
    assert loss.shape == () and loss.dtype == torch.float32


def test_logits_at_computes_those_positions_only(model):
    idx = torch.randint(0, model.config.vocab_size, (2, 10))
    full, _ = model(idx)
    at = torch.tensor([0, 4, 9])
    some, _ = model(idx, logits_at=at)
    assert some.shape == (2, 3, model.config.vocab_size)
    torch.testing.assert_close(some, full[:, at])
    with pytest.raises(ValueError, match="logits_at"):
        model(idx, targets=idx, logits_at=at)


def test_forward_rejects_too_long_input(model):
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_loss_ignores_masked_targets(model):
    idx = torch.randint(0, 64, (2, 8))
    targets = torch.full((2, 8), -100)
    targets[1, 5] = 7
    logits, loss = model(idx, targets)
    expected = F.cross_entropy(logits[1, 5].unsqueeze(0), torch.tensor([7]))
    torch.testing.assert_close(loss, expected)


def test_loss_is_float32_in_bf16(model):
    idx = torch.randint(0, 64, (2, 8))
    logits, loss = model.to(torch.bfloat16)(idx, idx)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32


def test_golden_loss():
    torch.manual_seed(0)
    model = GPT(TINY)
    x = torch.randint(0, 64, (4, 16))
    y = torch.randint(0, 64, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _, first = model(x, y)
    for _ in range(20):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    _, final = model(x, y)
    assert abs(first.item() - math.log(64)) < 0.3
    assert final.item() < 2.2  # from ln(64) = 4.16 by memorising the batch
    assert final.item() == pytest.approx(1.6235, abs=0.1)  # measured on torch 2.13 CPU


def test_flops_per_token_gpt2():
    cfg = config_from_preset("gpt2", vocab_size=50257, block_size=1024)
    L, C, T = 12, 768, 1024
    n = L * (12 * C * C + 13 * C) + 2 * C  # per block: 12 C^2 weights, 13 C biases/LN; plus ln_f
    assert flops_per_token(cfg) == 6 * n + 12 * L * C * T
    assert flops_per_token(cfg, n_params_non_embedding=85_000_000) == 6 * 85_000_000 + 12 * L * C * T
    assert 6 * 85e6 < flops_per_token(cfg) < 6 * 85e6 * 1.25  # attention adds ~22% at T=1024


def test_save_load_round_trip(model, tmp_path):
    save_model(model, str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_model(str(tmp_path))
    assert loaded.config == model.config
    assert loaded.transformer.wte.weight is loaded.lm_head.weight  # still tied
    idx = torch.randint(0, 64, (2, 10))
    assert torch.equal(model(idx)[0], loaded(idx)[0])
    # plain safetensors, no pickle: readable without the model class
    tensors = safetensors.torch.load_file(str(tmp_path / "model.safetensors"))
    assert "transformer.h.0.attn.c_attn.weight" in tensors
    assert json.loads((tmp_path / "config.json").read_text()) == model.config.to_dict()


def test_config_dict_round_trip():
    d = TINY.to_dict() | {"quantization": "int8_dynamic"}
    assert GPTConfig.from_dict(d) == TINY


def test_config_validation_names_every_problem():
    with pytest.raises(ValueError, match="n_embd.*n_head") as e:
        GPTConfig(n_embd=10, n_head=3, dropout=1.5)
    assert "dropout" in str(e.value)


def test_config_from_preset():
    cfg = config_from_preset("mini", vocab_size=100, dropout=None)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.vocab_size, cfg.dropout) == (6, 6, 384, 100, 0.0)
    for name in PRESETS:
        config_from_preset(name)


def test_config_from_preset_errors():
    with pytest.raises(ValueError, match="gpt5") as e:
        config_from_preset("gpt5")
    assert "gpt2-xl" in str(e.value)  # lists the known presets
    with pytest.raises(ValueError, match="n_layers"):
        config_from_preset("tiny", n_layers=3)


# ----------------------------------------------------------------------------- KV cache


def test_cached_logits_match_full_forward(model):
    """Prefill a prefix, then feed the rest one token and then several at a time: same logits as one pass."""
    idx = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    full, _ = model(idx)
    cache = model.new_cache(2)
    parts = [model(idx[:, :5], cache=cache)[0], model(idx[:, 5:6], cache=cache)[0], model(idx[:, 6:], cache=cache)[0]]
    assert cache.length == 12
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="block_size"):
        model(idx[:, :5], cache=cache)  # 12 + 5 > 16
