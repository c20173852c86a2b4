import dataclasses
import json

import pytest
import safetensors.torch
import torch

from components.artifacts import QuantizedModel
from components.accounting import linear_bytes, parameter_counts
from components.generation import generate
from components.model import GPT, load_model, save_model
from components.quantize import (
    RUNS_ON,
    VARIANTS,
    VariantUnavailable,
    apply_int8_dynamic,
    apply_torchao,
    load_variant,
    pick_device,
    quantize_model,
    stored_bytes,
)

CPU_VARIANTS = [v for v in VARIANTS if "cpu" in RUNS_ON[v]]
CUDA_VARIANTS = [v for v in VARIANTS if "cuda" in RUNS_ON[v]]
# max |logit difference| to fp32 allowed per variant (the tiny model's logits are about +-1):
# bf16 keeps 8 bits of mantissa, fp16 11; int8 rounds each weight to 1/127 of its row's (or
# tensor's) largest; int4 to 1/7 of its group's range.
TOLERANCE = {"fp32": 0.0, "bf16": 0.05, "fp16": 0.01, "int8_dynamic": 0.05, "int8_weight_only": 0.05,
             "int4_weight_only": 0.25}
STORED_DTYPES = {
    "fp32": {torch.float32},
    "bf16": {torch.bfloat16},
    "fp16": {torch.float16},
    "int8_dynamic": {torch.float32, torch.int8, torch.float64, torch.int64},
    "int8_weight_only": {torch.float32, torch.int8},  # Int8Tensor: int8 qdata, fp32 scale, int8 zero point
}


@pytest.fixture(scope="module")
def src(tmp_path_factory, tiny_config):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("src")
    save_model(GPT(tiny_config), str(folder))
    (folder / "tokenizer.json").write_text('{"model": {}}')
    return folder


@pytest.fixture(scope="module")
def idx():
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("variant", CPU_VARIANTS)
def test_round_trip(variant, src, idx, tmp_path, tiny_config):
    result = quantize_model(str(src), variant, str(tmp_path))
    assert result == QuantizedModel(variant, str(tmp_path), (tmp_path / "model.safetensors").stat().st_size)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json",
                                                              "tokenizer_config.json"]
    assert json.loads((tmp_path / "config.json").read_text())["quantization"] == variant

    model = load_variant(str(tmp_path))
    assert model.config == tiny_config and not model.training
    ref = load_model(str(src))(idx)[0]
    logits = model(idx)[0].float()
    assert torch.isfinite(logits).all()
    assert (logits - ref).abs().max().item() <= TOLERANCE[variant]
    assert parameter_counts(model)["total"] == parameter_counts(load_model(str(src)))["total"]
    assert model.transformer.wte.weight is model.lm_head.weight  # still tied

    out = generate(model, idx[:, :4], 6, temperature=0.8, top_k=10, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 10) and out.dtype == torch.long
    greedy = [generate(model, idx[:, :4], 14, temperature=0, use_cache=c) for c in (True, False)]
    assert torch.equal(*greedy)  # the KV cache changes nothing, quantized or not


@pytest.mark.parametrize("variant", CPU_VARIANTS)
def test_stored_in_variant_dtype_without_pickle(variant, src, tmp_path):
    quantize_model(str(src), variant, str(tmp_path))
    tensors = safetensors.torch.load_file(str(tmp_path / "model.safetensors"))  # refuses anything but safetensors
    assert {t.dtype for t in tensors.values()} == STORED_DTYPES[variant]
    if variant == "int8_dynamic":
        assert tensors["transformer.h.0.mlp.c_fc.weight_int8"].shape == (64, 16)
    if variant == "int8_weight_only":
        assert tensors["transformer.h.0.mlp.c_fc._weight_qdata"].shape == (64, 16)
        assert tensors["transformer.h.0.mlp.c_fc._weight_scale"].shape == (64, 1)  # one scale per output row
        assert "transformer.h.0.mlp.c_fc.weight" not in tensors
    if variant.startswith("int8"):
        assert tensors["transformer.wte.weight"].dtype == torch.float32  # embeddings and tied lm_head stay fp32
        assert "lm_head.weight" not in tensors


@pytest.mark.parametrize("variant", ["int8_dynamic", "int8_weight_only"])
def test_int8_matches_in_memory_quantization_exactly(variant, src, idx, tmp_path):
    quantize_model(str(src), variant, str(tmp_path))
    model = load_model(str(src))
    in_memory = apply_int8_dynamic(model) if variant == "int8_dynamic" else apply_torchao(model, variant)
    assert torch.equal(load_variant(str(tmp_path))(idx)[0], in_memory(idx)[0])


def test_torchao_loads_stored_int8_values_without_the_fp32_model(src, tmp_path):
    quantize_model(str(src), "int8_weight_only", str(tmp_path / "int8"))
    stored = safetensors.torch.load_file(str(tmp_path / "int8" / "model.safetensors"))
    model = load_variant(str(tmp_path / "int8"))  # only the int8 folder: nothing to re-quantize from
    weight = model.transformer.h[1].attn.c_proj.weight
    assert type(weight).__name__ == "Int8Tensor"
    assert torch.equal(weight.qdata, stored["transformer.h.1.attn.c_proj._weight_qdata"])
    assert torch.equal(weight.scale, stored["transformer.h.1.attn.c_proj._weight_scale"])
    assert isinstance(model.lm_head, torch.nn.Linear) and model.transformer.wte.weight is model.lm_head.weight


def test_int8_dynamic_only_quantizes_blocks(src, tmp_path):
    quantize_model(str(src), "int8_dynamic", str(tmp_path))
    model = load_variant(str(tmp_path))
    assert type(model) is GPT
    assert isinstance(model.lm_head, torch.nn.Linear)
    assert model.transformer.wte.weight is model.lm_head.weight
    assert isinstance(model.transformer.h[0].attn.c_attn, torch.ao.nn.quantized.dynamic.Linear)


def test_saved_sizes_reflect_the_quantization(tmp_path, tiny_config):
    torch.manual_seed(0)
    save_model(GPT(dataclasses.replace(tiny_config, vocab_size=256, n_embd=128)), str(tmp_path / "src"))
    built = {v: quantize_model(str(tmp_path / "src"), v, str(tmp_path / v)) for v in CPU_VARIANTS}
    disk = {v: stored_bytes(str(tmp_path / v)) for v in CPU_VARIANTS}
    for v in CPU_VARIANTS:
        assert sum(disk[v][0].values()) <= built[v].size_bytes < sum(disk[v][0].values()) + 20_000  # + header
    fp32_linear = disk["fp32"][1]
    assert fp32_linear == 4 * 2 * (12 * 128 * 128 + 9 * 128)  # weights + biases of 4 Linears per block, fp32
    assert disk["bf16"][1] == disk["fp16"][1] == fp32_linear // 2
    for v in ("int8_dynamic", "int8_weight_only"):
        # int8 weights, a scale per tensor or row, fp32 biases: the Linears take close to a quarter of fp32's bytes
        assert 3.5 * disk[v][1] <= fp32_linear, v
        assert built[v].size_bytes < 0.5 * built["fp32"].size_bytes  # the fp32 embeddings keep the file above 1/4
        assert linear_bytes(load_variant(str(tmp_path / v))) * 3.5 <= linear_bytes(load_variant(str(tmp_path / "fp32")))


def test_unknown_variant(src, tmp_path):
    with pytest.raises(ValueError, match="int3") as e:
        quantize_model(str(src), "int3", str(tmp_path))
    assert all(v in str(e.value) for v in VARIANTS)
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_int4_is_unavailable_without_cuda(src, tmp_path):
    with pytest.raises(VariantUnavailable, match="CUDA"):
        quantize_model(str(src), "int4_weight_only", str(tmp_path / "int4"))
    assert not (tmp_path / "int4").exists()  # nothing written


def test_pick_device():
    assert pick_device("fp32", "auto", cuda_available=True) == "cuda"
    assert pick_device("fp32", "auto", cuda_available=False) == "cpu"
    assert pick_device("int8_dynamic", "auto", cuda_available=True) == "cpu"  # CPU-only kernels
    assert pick_device("int8_weight_only", "cpu", cuda_available=True) == "cpu"
    with pytest.raises(VariantUnavailable, match="int8_dynamic does not run on cuda"):
        pick_device("int8_dynamic", "cuda", cuda_available=True)
    with pytest.raises(VariantUnavailable, match="no CUDA GPU"):
        pick_device("int4_weight_only", "auto", cuda_available=False)
    with pytest.raises(VariantUnavailable, match="no CUDA GPU"):
        pick_device("bf16", "cuda", cuda_available=False)
    with pytest.raises(VariantUnavailable, match="does not run on cpu"):
        pick_device("int4_weight_only", "cpu", cuda_available=True)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", CUDA_VARIANTS)
def test_round_trip_on_cuda(variant, idx, tmp_path, tiny_config):
    torch.manual_seed(0)  # 128 wide: int4's groups of 128 and its tile packing need whole tiles
    save_model(GPT(dataclasses.replace(tiny_config, n_embd=128)), str(tmp_path / "src"))
    quantize_model(str(tmp_path / "src"), variant, str(tmp_path / variant), device="cuda")
    model = load_variant(str(tmp_path / variant), "cuda")
    ref = load_model(str(tmp_path / "src"))(idx)[0]
    logits = model(idx.cuda())[0].float().cpu()
    assert torch.isfinite(logits).all()
    assert (logits - ref).abs().max().item() <= TOLERANCE[variant]
    greedy = [generate(model, idx[:, :4].cuda(), 10, temperature=0, use_cache=c) for c in (True, False)]
    assert torch.equal(*greedy)
