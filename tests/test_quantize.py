import json

import pytest
import safetensors.torch
import torch

from components.artifacts import QuantizedModel
from components.model import GPT, GPTConfig, load_model, parameter_counts, save_model
from components.quantize import VARIANTS, apply_int8_dynamic, load_variant, quantize_model

TINY = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=16)
# max |logit difference| to fp32 allowed per variant (tiny model's logits are about +-1)
TOLERANCE = {"fp32": 0.0, "bf16": 0.05, "fp16": 0.01, "int8_dynamic": 0.05}


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("src")
    save_model(GPT(TINY), str(folder))
    (folder / "tokenizer.json").write_text('{"model": {}}')
    return folder


@pytest.fixture(scope="module")
def idx():
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("variant", VARIANTS)
def test_round_trip(variant, src, idx, tmp_path):
    result = quantize_model(str(src), variant, str(tmp_path))
    assert result == QuantizedModel(variant, str(tmp_path), (tmp_path / "model.safetensors").stat().st_size)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert json.loads((tmp_path / "config.json").read_text())["quantization"] == variant

    model = load_variant(str(tmp_path))
    assert model.config == TINY and not model.training
    ref = load_model(str(src))(idx)[0]
    logits = model(idx)[0].float()
    assert (logits - ref).abs().max().item() <= TOLERANCE[variant]
    assert parameter_counts(model)["total"] == parameter_counts(load_model(str(src)))["total"]

    out = model.generate(idx[:, :4], 6, temperature=0.8, top_k=10, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 10) and out.dtype == torch.long


@pytest.mark.parametrize("variant", VARIANTS)
def test_stored_in_variant_dtype_without_pickle(variant, src, tmp_path):
    quantize_model(str(src), variant, str(tmp_path))
    tensors = safetensors.torch.load_file(str(tmp_path / "model.safetensors"))  # refuses anything but safetensors
    dtypes = {t.dtype for t in tensors.values()}
    expected = {
        "fp32": {torch.float32},
        "bf16": {torch.bfloat16},
        "fp16": {torch.float16},
        "int8_dynamic": {torch.float32, torch.int8, torch.float64, torch.int64},
    }[variant]
    assert dtypes == expected
    if variant == "int8_dynamic":
        assert tensors["transformer.h.0.mlp.c_fc.weight_int8"].shape == (64, 16)
        assert tensors["transformer.wte.weight"].dtype == torch.float32  # embeddings and tied lm_head stay fp32


def test_int8_matches_in_memory_quantization_exactly(src, idx, tmp_path):
    quantize_model(str(src), "int8_dynamic", str(tmp_path))
    in_memory = apply_int8_dynamic(load_model(str(src)))
    assert torch.equal(load_variant(str(tmp_path))(idx)[0], in_memory(idx)[0])


def test_int8_only_quantizes_blocks(src, tmp_path):
    quantize_model(str(src), "int8_dynamic", str(tmp_path))
    model = load_variant(str(tmp_path))
    assert type(model) is GPT
    assert isinstance(model.lm_head, torch.nn.Linear)
    assert model.transformer.wte.weight is model.lm_head.weight
    assert isinstance(model.transformer.h[0].attn.c_attn, torch.ao.nn.quantized.dynamic.Linear)


def test_int8_file_is_smaller(tmp_path):
    torch.manual_seed(0)
    save_model(GPT(GPTConfig(block_size=16, vocab_size=256, n_layer=2, n_head=2, n_embd=128)), str(tmp_path / "src"))
    fp32 = quantize_model(str(tmp_path / "src"), "fp32", str(tmp_path / "fp32"))
    int8 = quantize_model(str(tmp_path / "src"), "int8_dynamic", str(tmp_path / "int8"))
    # the blocks shrink 4x; the fp32 embeddings keep it from the full 4x
    assert int8.size_bytes < 0.5 * fp32.size_bytes


def test_unknown_variant(src, tmp_path):
    with pytest.raises(ValueError, match="int4") as e:
        quantize_model(str(src), "int4", str(tmp_path))
    assert all(v in str(e.value) for v in VARIANTS)
    assert not any(tmp_path.iterdir())  # nothing written
