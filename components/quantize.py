"""The `quantize` stage: turn an fp32 model folder into one candidate variant on disk.

Every variant is stored in its own dtype as safetensors + config.json (with a
"quantization" key), never pickled, so `load_variant` can rebuild it anywhere.

int8_dynamic uses eager torch.ao `quantize_dynamic`. torchao (`quantize_` with
Int8DynamicActivationInt8WeightConfig) is its successor, but on CPU it is only faster
under torch.compile; the eager torch.ao kernels were the fastest without compiling
(../shared/NOTES.md, "Quantization on CPU": batch-1 decode 2.90 ms -> 1.53 ms per step).
"""
from __future__ import annotations

import json
import os
import shutil
import warnings

import safetensors.torch
import torch
import torch.nn as nn

from components.artifacts import QuantizedModel
from components.files import atomic_write, write_json_atomic
from components.model import CONFIG_FILE, GPT, WEIGHTS_FILE, GPTConfig, load_model

VARIANTS = ("fp32", "bf16", "fp16", "int8_dynamic")
_FLOAT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOKENIZER_FILE = "tokenizer.json"
CANDIDATE_FILES = (WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE)
"""Exactly the files of a candidate folder (besides checksums.json); serving refuses any other set."""

# Keys of the int8 file, per quantized Linear `<name>`: <name>.weight_int8 (out, in) int8,
# <name>.weight_scale and <name>.weight_zero_point ((1,) for per-tensor, (out,) for per-channel),
# <name>.bias (fp32, when the layer has one). The qscheme (and axis) go in the file metadata.
_INT8_SUFFIXES = (".weight_int8", ".weight_scale", ".weight_zero_point")


def apply_int8_dynamic(model: GPT) -> GPT:
    """Swap the Linears inside `model.transformer.h` for dynamic int8 ones, in place.

    Only the blocks are quantized: lm_head shares its weight with the token embedding,
    and quantizing it would either untie them (storing the matrix twice) or force int8
    embeddings; both embeddings and lm_head stay fp32. The model keeps its GPT class, so
    `.config` and `.generate` still work.
    """
    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated in favour of torchao (see module docstring),
        # and it warns about creating quantized tensors; both still work in torch 2.13.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.ao")
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*")
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated.*")
        torch.ao.quantization.quantize_dynamic(model.transformer.h, {nn.Linear}, dtype=torch.qint8, inplace=True)
    return model.eval()


def _quantized_linears(model: nn.Module) -> dict[str, nn.Module]:
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)
    }


def _int8_state(model: GPT) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata for the int8 file (see the key layout above)."""
    tensors: dict[str, torch.Tensor] = {}
    metadata = {"format": "pt", "quantization": "int8_dynamic"}
    for name, qlinear in _quantized_linears(model).items():
        w = qlinear.weight()  # quantized (out, in)
        scheme = w.qscheme()
        tensors[name + ".weight_int8"] = w.int_repr().contiguous()
        if scheme in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            # float64 keeps the Python-float scale exact
            tensors[name + ".weight_scale"] = torch.tensor([w.q_scale()], dtype=torch.float64)
            tensors[name + ".weight_zero_point"] = torch.tensor([w.q_zero_point()], dtype=torch.int64)
            metadata[name + ".qscheme"] = "per_tensor"
        elif scheme in (torch.per_channel_affine, torch.per_channel_symmetric):
            tensors[name + ".weight_scale"] = w.q_per_channel_scales().to(torch.float64).contiguous()
            tensors[name + ".weight_zero_point"] = w.q_per_channel_zero_points().to(torch.int64).contiguous()
            metadata[name + ".qscheme"] = "per_channel"
            metadata[name + ".axis"] = str(w.q_per_channel_axis())
        else:
            raise NotImplementedError(f"{name}: unsupported qscheme {scheme}")
        bias = qlinear.bias()
        if bias is not None:
            tensors[name + ".bias"] = bias.detach().float().contiguous()
    # everything not quantized (embeddings, LayerNorms, the tied lm_head once) in fp32
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        tensors[name] = t.detach().float().contiguous()
    return tensors, metadata


def _load_int8_state(model: GPT, tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: str) -> None:
    """Inverse of `_int8_state` on a freshly quantized model of the same config."""
    expected = set()
    for name, qlinear in _quantized_linears(model).items():
        expected.update(name + s for s in _INT8_SUFFIXES)
        int_repr = tensors[name + ".weight_int8"]
        scale, zero_point = tensors[name + ".weight_scale"], tensors[name + ".weight_zero_point"]
        if metadata.get(name + ".qscheme") == "per_channel":
            w_q = torch._make_per_channel_quantized_tensor(
                int_repr, scale, zero_point, int(metadata[name + ".axis"])
            )
        else:
            w_q = torch._make_per_tensor_quantized_tensor(int_repr, scale.item(), int(zero_point.item()))
        bias = tensors.get(name + ".bias")
        if bias is not None:
            expected.add(name + ".bias")
        qlinear.set_weight_bias(w_q, bias)
    plain = dict(model.named_parameters()) | dict(model.named_buffers())
    expected.update(plain)
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise ValueError(f"{path} does not match its config.json: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for name, t in plain.items():
            t.copy_(tensors[name])


def quantize_model(src_folder: str, variant: str, out_folder: str) -> QuantizedModel:
    """Write `variant` of the fp32 model in `src_folder` to `out_folder`, stored in that dtype.

    Args:
        src_folder: folder written by `components.model.save_model`.
        variant: one of VARIANTS.
        out_folder: created if missing; gets model.safetensors, config.json (with
            "quantization": variant) and tokenizer.json when the source has one.

    Returns:
        QuantizedModel with size_bytes = size of model.safetensors.

    Raises:
        ValueError: unknown variant.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown quantization variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    model = load_model(src_folder)
    os.makedirs(out_folder, exist_ok=True)
    weights = os.path.join(out_folder, WEIGHTS_FILE)
    if variant in _FLOAT_DTYPES:
        atomic_write(weights, lambda tmp: safetensors.torch.save_model(
            model.to(_FLOAT_DTYPES[variant]), str(tmp), metadata={"quantization": variant}))
    else:
        tensors, metadata = _int8_state(apply_int8_dynamic(model))
        atomic_write(weights, lambda tmp: safetensors.torch.save_file(tensors, str(tmp), metadata=metadata))
    write_json_atomic(os.path.join(out_folder, CONFIG_FILE), {**model.config.to_dict(), "quantization": variant})
    tokenizer = os.path.join(src_folder, TOKENIZER_FILE)
    if os.path.exists(tokenizer):
        shutil.copyfile(tokenizer, os.path.join(out_folder, TOKENIZER_FILE))
    return QuantizedModel(variant=variant, uri=out_folder, size_bytes=os.path.getsize(weights))


def load_variant(folder: str) -> nn.Module:
    """Load a folder written by `quantize_model` (or `save_model`: treated as fp32), in eval mode.

    The result is a GPT (int8: with dynamic-quantized Linears in its blocks), so it has
    `.config` and `.generate`. An int8 model gives exactly the logits of the model that was
    quantized in memory before saving.

    Raises:
        FileNotFoundError: config.json or model.safetensors missing.
        ValueError: unknown "quantization" value, or weights that do not match the config.
    """
    config_path, weights = os.path.join(folder, CONFIG_FILE), os.path.join(folder, WEIGHTS_FILE)
    for path in (config_path, weights):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found; is {folder!r} a folder written by quantize_model?")
    with open(config_path) as f:
        raw = json.load(f)
    variant = raw.get("quantization", "fp32")
    if variant not in VARIANTS:
        raise ValueError(f"{config_path}: unknown quantization {variant!r}; expected one of {', '.join(VARIANTS)}")
    model = GPT(GPTConfig.from_dict(raw))
    if variant in _FLOAT_DTYPES:
        model = model.to(_FLOAT_DTYPES[variant])
        safetensors.torch.load_model(model, weights, strict=True)
        return model.eval()
    apply_int8_dynamic(model)
    with safetensors.safe_open(weights, framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    _load_int8_state(model, tensors, metadata, weights)
    return model.eval()
