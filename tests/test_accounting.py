"""Parameter counts and bytes of a tiny GPT, and the per-worker shares check."""
import torch

from components.accounting import bytes_by_dtype, parameter_counts, summarize_shares
from components.model import GPT, config_from_preset, flops_per_token


def test_parameter_counts(tiny_model):
    model, cfg = tiny_model, tiny_model.config
    counts = parameter_counts(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters())  # parameters() dedupes the tie
    assert counts["trainable"] == counts["total"]
    assert counts["module/lm_head"] == 0
    assert counts["module/wte"] == 64 * 16 and counts["module/wpe"] == 16 * 16
    assert counts["embedding"] == 64 * 16 + 16 * 16
    assert counts["embedding"] + counts["non_embedding"] == counts["total"]
    module_keys = [k for k in counts if k.startswith("module/")]
    assert set(module_keys) == {"module/wte", "module/wpe", "module/h", "module/ln_f", "module/lm_head"}
    assert sum(counts[k] for k in module_keys) == counts["total"]
    assert counts["non_embedding"] == flops_per_token(cfg) // 6 - 2 * cfg.n_layer * cfg.n_embd * cfg.block_size


def test_parameter_counts_with_frozen_base(tiny_model):
    model = tiny_model
    for p in model.parameters():
        p.requires_grad_(False)
    model.lm_head.weight.requires_grad_(True)
    counts = parameter_counts(model)
    assert counts["trainable"] == 64 * 16
    assert counts["total"] == sum(p.numel() for p in model.parameters())


def test_bytes_by_dtype(tiny_model):
    model = tiny_model
    assert bytes_by_dtype(model) == {"float32": 4 * parameter_counts(model)["total"]}


def test_gpt2_small_has_124m_params():
    cfg = config_from_preset("gpt2", vocab_size=50257, block_size=1024)
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = GPT(cfg)
    counts = parameter_counts(model)
    assert counts["total"] == 124_439_808
    assert counts["non_embedding"] == 85_056_000


def test_shares_that_do_not_add_up_are_flagged():
    piece = ("w", (0, 0), (2, 4), 8, 32)
    half = [("w", (0, 0), (1, 4), 4, 16)]  # the other half of w is held by nobody
    assert summarize_shares([[piece], [piece]], 8)["parallel/param_counts_add_up"] == 1.0
    shares = summarize_shares([half, half], 8)
    assert shares["parallel/param_count_sum_unique"] == 4
    assert shares["parallel/param_counts_add_up"] == 0.0
