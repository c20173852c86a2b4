"""The `quantize` stage: turn an fp32 model folder into one candidate variant on disk.

Every variant is stored in its own dtype as safetensors + config.json (with a
"quantization" key), never pickled, so `load_variant` rebuilds it, still quantized,
without going back to fp32.

The variants and where they run:
- fp32, bf16, fp16: the same GPT cast to that dtype; CPU and CUDA.
- int8_dynamic: eager torch.ao `quantize_dynamic` (int8 weights, activations quantized
  per batch); CPU only. On CPU it is the fastest eager int8 path: about twice as fast
  as fp32 at batch-1 decode in benchmarks/quantization.py, where int8_weight_only gains
  little; torchao's Int8DynamicActivationInt8WeightConfig is only faster under torch.compile.
- int8_weight_only: torchao `Int8WeightOnlyConfig` (int8 weights with a per-row scale,
  fp32 activations); CPU and CUDA.
- int4_weight_only: torchao `Int4WeightOnlyConfig` packed as `tile_packed_to_4d` (two
  weights per byte, a bf16 scale and zero point per group of 128, bf16 activations), the
  tinygemm kernel that ships in PyTorch's CUDA build. CUDA only: torchao 0.18 has no CPU
  packing for int4, and its CPU fallback (`IntxWeightOnlyConfig`) keeps int4 values
  unpacked in int8, which would be no smaller than int8_weight_only.

Only the Linear layers inside the blocks are quantized: lm_head shares its weight with
the token embedding, and quantizing it would untie them (storing the matrix twice).

A variant that cannot be built or run on a device raises `VariantUnavailable`; the
pipeline skips that candidate and logs the reason on its run.
"""
from __future__ import annotations

import json
import logging
import os
import struct
import shutil
import warnings

import safetensors.torch
import torch
import torch.nn as nn

from components.artifacts import QuantizedModel
from components.chat import TOKENIZER_CONFIG_FILE, load_chat_template, save_chat_template
from components.files import atomic_write, write_json_atomic
from components.model import CONFIG_FILE, GPT, WEIGHTS_FILE, GPTConfig, load_model
from components.tokenizer import TOKENIZER_FILE

RUNS_ON: dict[str, tuple[str, ...]] = {
    "fp32": ("cuda", "cpu"),  # preferred device first
    "bf16": ("cuda", "cpu"),
    "fp16": ("cuda", "cpu"),
    "int8_dynamic": ("cpu",),  # torch.ao dynamic quantized Linear: fbgemm/qnnpack kernels only
    "int8_weight_only": ("cuda", "cpu"),
    "int4_weight_only": ("cuda",),  # packing and kernel are CUDA only (module docstring)
}
VARIANTS = tuple(RUNS_ON)
_FLOAT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_TORCHAO_VARIANTS = {"int8_weight_only": torch.float32, "int4_weight_only": torch.bfloat16}  # -> activation dtype
_INT4_GROUP_SIZE = 128
CANDIDATE_FILES = (WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE)
"""Exactly the files of a candidate folder (besides checksums.json); serving refuses any other set."""


def candidate_files(folder) -> tuple[str, ...]:
    """The files `folder` must hold: CANDIDATE_FILES, less tokenizer_config.json (the chat template)
    where the folder has none, as candidates registered before it was added do not. One that
    checksums.json lists must still be there (the check then names it)."""
    has_config = os.path.exists(os.path.join(folder, TOKENIZER_CONFIG_FILE))
    return tuple(n for n in CANDIDATE_FILES if n != TOKENIZER_CONFIG_FILE or has_config)

# Keys of the int8 file, per quantized Linear `<name>`: <name>.weight_int8 (out, in) int8,
# <name>.weight_scale and <name>.weight_zero_point ((1,) for per-tensor, (out,) for per-channel),
# <name>.bias (fp32, when the layer has one). The qscheme (and axis) go in the file metadata.
_INT8_SUFFIXES = (".weight_int8", ".weight_scale", ".weight_zero_point")


class VariantUnavailable(RuntimeError):
    """A variant cannot be built or run here; the message says why. The candidate is skipped."""


def pick_device(variant: str, requested: str, cuda_available: bool) -> str:
    """Where `variant` should run: `requested` ("cpu" or "cuda"), or for "auto" the fastest device present.

    Raises:
        VariantUnavailable: the variant does not run on the requested device, or needs CUDA and
            there is none.
    """
    runs_on = RUNS_ON[variant]
    if requested == "auto":
        usable = [d for d in runs_on if d == "cpu" or cuda_available]
        if not usable:
            raise VariantUnavailable(f"{variant} runs only on {'/'.join(runs_on)}, and no CUDA GPU is available")
        return usable[0]
    if requested not in runs_on:
        raise VariantUnavailable(f"{variant} does not run on {requested} (it runs on {'/'.join(runs_on)})")
    if requested == "cuda" and not cuda_available:
        raise VariantUnavailable(f"evaluate.device is cuda, but no CUDA GPU is available for {variant}")
    return requested


def _torchao():
    """Import torchao's quantize_ API, or say why the torchao variants are unavailable."""
    # On a CPU-only torch, torchao logs at import that its CUDA extensions cannot load, and
    # torch's pytree warns that registering torchao's enums is deprecated; both are harmless:
    # the CPU variants use none of those kernels, and the enums still work.
    quiet = [logging.getLogger(name) for name in ("torchao", "torchao.kernel.intmm", "torch.utils._pytree")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.ERROR)
    try:
        import torchao.quantization as tq
        from torchao.prototype.safetensors import safetensors_support
    except ImportError as error:
        raise VariantUnavailable(f"torchao is not installed or does not import ({error}); pip install torchao") from None
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)
    return tq, safetensors_support


def _torchao_config(variant: str):
    tq, _ = _torchao()
    if variant == "int8_weight_only":
        return tq.Int8WeightOnlyConfig()  # per-row scale
    return tq.Int4WeightOnlyConfig(group_size=_INT4_GROUP_SIZE, int4_packing_format="tile_packed_to_4d")


def _in_blocks(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, nn.Linear) and fqn.startswith("transformer.h.")


def apply_torchao(model: GPT, variant: str, device: str = "cpu") -> GPT:
    """Quantize the blocks' Linears of `model` in place with torchao's `variant` config, on `device`.

    Raises:
        VariantUnavailable: torchao is missing, the variant needs CUDA and `device` is not, or (int4)
            a layer width is not a multiple of the group size.
    """
    if "cuda" not in device and "cpu" not in RUNS_ON[variant]:
        raise VariantUnavailable(f"{variant} is quantized on CUDA only (torchao 0.18 has no CPU int4 packing)")
    if variant == "int4_weight_only":
        odd = sorted({m.in_features for n, m in model.named_modules()
                      if _in_blocks(m, n) and m.in_features % _INT4_GROUP_SIZE})
        if odd:
            raise VariantUnavailable(f"int4_weight_only packs groups of {_INT4_GROUP_SIZE} inputs; "
                                     f"Linear input widths {odd} are not multiples of it")
    config = _torchao_config(variant)
    tq, _ = _torchao()
    model = model.to(device=device, dtype=_TORCHAO_VARIANTS[variant])
    tq.quantize_(model, config, filter_fn=_in_blocks)
    return model.eval()


def apply_int8_dynamic(model: GPT) -> GPT:
    """Swap the Linears inside `model.transformer.h` for dynamic int8 ones, in place.

    Only the blocks are quantized: lm_head shares its weight with the token embedding,
    and quantizing it would either untie them (storing the matrix twice) or force int8
    embeddings; both embeddings and lm_head stay fp32. The model keeps its GPT class, so
    `.config` and `.new_cache` (what generation uses) still work.
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


def _torchao_state(model: GPT, variant: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Plain tensors and metadata for a torchao-quantized GPT; `_load_torchao_state` reverses it
    exactly (the loaded model gives the same logits).

    torchao's weights are tensor subclasses (Int8Tensor: `qdata` int8 + `scale`, ...), which
    `safetensors` cannot store directly. `flatten_tensor_state_dict` splits each into its
    plain tensors (`<module>._weight_qdata`, `<module>._weight_scale`, ...) and a JSON
    description (class name from an allow-list, block size, dtype) in the file metadata.
    """
    _, st = _torchao()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied to wte
    tensors, metadata = st.flatten_tensor_state_dict(state)
    return {k: v.contiguous() for k, v in tensors.items()}, {**metadata, "format": "pt", "quantization": variant}


def _load_torchao_state(config: GPTConfig, tensors: dict, metadata: dict, path: str, device: str) -> GPT:
    """Inverse of `_torchao_state`: the quantized tensors go straight into a model built on `meta`.

    Nothing is quantized again: `load_state_dict(assign=True)` puts the stored torchao tensors
    in place of the meta parameters.
    """
    _, st = _torchao()
    state, leftover = st.unflatten_tensor_state_dict(tensors, metadata)
    if leftover:
        raise ValueError(f"{path}: tensors not described by the file's metadata: {sorted(leftover)[:5]}")
    state["lm_head.weight"] = state.get("transformer.wte.weight")
    with torch.device("meta"):
        model = GPT(config)
    model.requires_grad_(False)  # inference only; torchao's tensors take no gradients
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        raise ValueError(f"{path} does not match its config.json: {error}") from None
    model.lm_head.weight = model.transformer.wte.weight  # re-tie: one tensor under two names
    return model.to(device).eval()


def quantize_model(src_folder: str, variant: str, out_folder: str, device: str = "cpu") -> QuantizedModel:
    """Write `variant` of the fp32 model in `src_folder` to `out_folder`, stored in that dtype.

    Args:
        src_folder: folder written by `components.model.save_model`.
        variant: one of VARIANTS.
        out_folder: created if missing; gets model.safetensors, config.json (with
            "quantization": variant), tokenizer.json when the source has one and
            tokenizer_config.json (the source's chat template, if any).
        device: where to quantize ("cuda" for int4_weight_only); the file is the same wherever it is made.

    Returns:
        QuantizedModel with size_bytes = size of model.safetensors.

    Raises:
        ValueError: unknown variant.
        VariantUnavailable: the variant cannot be built here (nothing is written).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown quantization variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    model = load_model(src_folder)
    if variant in _TORCHAO_VARIANTS:
        tensors, metadata = _torchao_state(apply_torchao(model, variant, device), variant)
    elif variant == "int8_dynamic":
        tensors, metadata = _int8_state(apply_int8_dynamic(model))
    os.makedirs(out_folder, exist_ok=True)
    weights = os.path.join(out_folder, WEIGHTS_FILE)
    if variant in _FLOAT_DTYPES:
        atomic_write(weights, lambda tmp: safetensors.torch.save_model(
            model.to(_FLOAT_DTYPES[variant]), str(tmp), metadata={"quantization": variant}))
    else:
        atomic_write(weights, lambda tmp: safetensors.torch.save_file(tensors, str(tmp), metadata=metadata))
    write_json_atomic(os.path.join(out_folder, CONFIG_FILE), {**model.config.to_dict(), "quantization": variant})
    tokenizer = os.path.join(src_folder, TOKENIZER_FILE)
    if os.path.exists(tokenizer):
        shutil.copyfile(tokenizer, os.path.join(out_folder, TOKENIZER_FILE))
    save_chat_template(out_folder, load_chat_template(src_folder))  # every candidate has the file, a chat one a template
    return QuantizedModel(variant=variant, uri=out_folder, size_bytes=os.path.getsize(weights))


def load_variant(folder: str, device: str = "cpu") -> nn.Module:
    """Load a folder written by `quantize_model` (or `save_model`: treated as fp32), in eval mode.

    The result is a GPT (int8/int4: with quantized Linears in its blocks), so it has
    `.config` and `.new_cache`. A quantized model gives exactly the logits of the model that
    was quantized in memory before saving.

    Args:
        device: "cpu" or "cuda"; see `pick_device`.

    Raises:
        FileNotFoundError: config.json or model.safetensors missing.
        ValueError: unknown "quantization" value, or weights that do not match the config.
        VariantUnavailable: the variant does not run on `device` (or torchao is missing).
    """
    config_path, weights = os.path.join(folder, CONFIG_FILE), os.path.join(folder, WEIGHTS_FILE)
    for path in (config_path, weights):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found; is {folder!r} a folder written by quantize_model?")
    with open(config_path) as f:
        raw = json.load(f)
    return _load_variant(raw, folder, weights, device)


def load_variant_bytes(config: bytes, weights: bytes, device: str = "cpu", folder: str = "model") -> nn.Module:
    """`load_variant` from the contents of config.json and model.safetensors already read (and checked,
    `components.files.read_verified`), so that what was checked is what is loaded. `folder` names them in errors."""
    return _load_variant(json.loads(config), folder, weights, device)


def _load_variant(raw: dict, folder: str, weights: str | bytes, device: str) -> nn.Module:
    """The model that config `raw` describes with the safetensors `weights` (a path, or the file's bytes)."""
    config_path, where = os.path.join(folder, CONFIG_FILE), os.path.join(folder, WEIGHTS_FILE)
    variant = raw.get("quantization", "fp32")
    if variant not in VARIANTS:
        raise ValueError(f"{config_path}: unknown quantization {variant!r}; expected one of {', '.join(VARIANTS)}")
    if device.split(":")[0] not in RUNS_ON[variant]:
        raise VariantUnavailable(f"{variant} does not run on {device} (it runs on {'/'.join(RUNS_ON[variant])})")
    config = GPTConfig.from_dict(raw)
    if variant in _FLOAT_DTYPES:
        model = GPT(config).to(_FLOAT_DTYPES[variant])
        if isinstance(weights, bytes):
            _load_plain_state(model, safetensors.torch.load(weights), where)
        else:
            safetensors.torch.load_model(model, weights, strict=True)
        return model.to(device).eval()
    if isinstance(weights, bytes):
        tensors, metadata = safetensors.torch.load(weights), _file_metadata(weights)
    else:
        with safetensors.safe_open(weights, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    if variant in _TORCHAO_VARIANTS:
        return _load_torchao_state(config, tensors, metadata, where, device)
    model = apply_int8_dynamic(GPT(config))
    _load_int8_state(model, tensors, metadata, where)
    return model.eval()


def _load_plain_state(model: GPT, tensors: dict[str, torch.Tensor], where: str) -> None:
    """`tensors` into `model`, every name checked; a tied weight (lm_head) is stored under one of its names."""
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    state = model.state_dict()
    loaded = {state[name].data_ptr() for name in tensors if name in state}
    missing = [name for name in missing if state[name].data_ptr() not in loaded]
    if missing or unexpected:
        raise ValueError(f"{where} does not match its config.json: missing {sorted(missing)}, "
                         f"unexpected {sorted(unexpected)}")


def _file_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors file's header (8 bytes of length, then JSON)."""
    (header_len,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + header_len]).get("__metadata__") or {}


_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}


def stored_bytes(folder: str) -> tuple[dict[str, int], int]:
    """Bytes of `folder/model.safetensors` per stored dtype, and the bytes of the blocks' Linear layers.

    Read from the file's header (no tensor is loaded), so it measures what is on disk. A
    Linear layer's tensors are those under `transformer.h.<i>.attn.c_*` and `.mlp.c_*`
    (weights, their int values and scales, biases).
    """
    with open(os.path.join(folder, WEIGHTS_FILE), "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    by_dtype: dict[str, int] = {}
    linear = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"], info["dtype"].lower())
        by_dtype[dtype] = by_dtype.get(dtype, 0) + end - start
        if name.startswith("transformer.h.") and (".attn.c_" in name or ".mlp.c_" in name):
            linear += end - start
    return by_dtype, linear
