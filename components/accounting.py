"""What a model holds: parameter counts, bytes per storage dtype, and each worker's share.

The counts work on a plain GPT, on one wrapped by LoRA adapters, DDP or torch.compile,
on torch.ao dynamic-quantized and torchao-quantized GPTs, and on one split by FSDP2 or
tensor parallelism; each needs to know where those keep their tensors, which is why
this lives apart from the model file.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from components.model import LayerNorm
from components.parallel import unwrap

# ----------------------------------------------------------------------------- parameters and bytes


def _is_dynamic_quantized_linear(module: nn.Module) -> bool:
    # torch.ao dynamic Linear keeps its weight packed, outside parameters() and buffers()
    return hasattr(module, "_packed_params") and callable(getattr(module, "weight", None))


def _module_tensors(module: nn.Module, buffers: bool) -> list[tuple[object, torch.Tensor]]:
    """(identity key, tensor) for each tensor `module` holds directly (not in its children)."""
    out: list[tuple[object, torch.Tensor]] = [(id(t), t) for t in module.parameters(recurse=False)]
    if buffers:
        out += [(id(t), t) for t in module.buffers(recurse=False)]
    if _is_dynamic_quantized_linear(module):
        # weight() unpacks into a new tensor on every call, so key by module instead
        out.append(((id(module), "weight"), module.weight()))
        bias = module.bias()
        if bias is not None:
            out.append(((id(module), "bias"), bias))
    return out


def _unique_tensors(module: nn.Module, seen: set, buffers: bool = False) -> list[torch.Tensor]:
    """Tensors under `module` whose key is not in `seen` yet (`seen` is updated)."""
    out = []
    for m in module.modules():
        for key, t in _module_tensors(m, buffers):
            if key not in seen:
                seen.add(key)
                out.append(t)
    return out


def _find_gpt(model: nn.Module) -> nn.Module | None:
    """The module holding `transformer` and `lm_head`: the model itself, or one inside a wrapper."""
    for m in model.modules():
        if isinstance(getattr(m, "transformer", None), nn.ModuleDict) and hasattr(m, "lm_head"):
            return m
    return None


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Parameter counts, each tensor counted once (the tied lm_head/wte weight included).

    Works on a plain GPT, on one whose Linears are wrapped by LoRA adapters, and on a
    torch.ao dynamic-quantized GPT (packed int8 Linear weights and their biases count).

    Returns:
        "total", "trainable", "embedding" (wte + wpe), "non_embedding" (total - embedding), and
        "module/<name>" for each top-level submodule of `model.transformer` that holds
        parameters, plus "module/lm_head" (0 when tied: wte already counted it). The module
        keys sum to "total"; parameters outside the GPT (in a wrapper) go to "module/other".
    """
    total = sum(t.numel() for t in _unique_tensors(model, set()))
    trainable = sum(t.numel() for t in _unique_tensors(model, set()) if t.requires_grad)
    counts = {"total": total, "trainable": trainable}
    gpt = _find_gpt(model)
    if gpt is None:
        counts.update(embedding=0, non_embedding=total)
        return counts

    seen: set = set()  # shared, so the tied lm_head weight counts under wte only
    per_module = {}
    for name, sub in [*gpt.transformer.named_children(), ("lm_head", gpt.lm_head)]:
        n = sum(t.numel() for t in _unique_tensors(sub, seen))
        if n or name == "lm_head":
            per_module[f"module/{name}"] = n
    embedding = per_module.get("module/wte", 0) + per_module.get("module/wpe", 0)
    counts.update(embedding=embedding, non_embedding=total - embedding)
    if total != sum(per_module.values()):
        per_module["module/other"] = total - sum(per_module.values())
    counts.update(per_module)
    return counts


def _plain_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """The tensors that hold `t`'s bytes: itself, or a quantized tensor's int values and scales.

    torch.ao quantized tensors keep an int8 representation and (per channel) scale and zero
    point tensors; torchao tensor subclasses (Int8Tensor, Int4TilePackedTo4dTensor, ...)
    name their inner tensors in `__tensor_flatten__`. A per-tensor scale and zero point are
    two Python scalars per layer and are not counted.
    """
    if t.is_quantized:
        out = [t.int_repr()]
        if t.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            out += [t.q_per_channel_scales(), t.q_per_channel_zero_points()]
        return out
    if type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return [p for name in names for p in _plain_tensors(getattr(t, name))]
    return [t]


def _count_bytes(tensors: list[torch.Tensor]) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in tensors:
        for p in _plain_tensors(t):
            key = str(p.dtype).removeprefix("torch.")
            out[key] = out.get(key, 0) + p.numel() * p.element_size()
    return out


def bytes_by_dtype(model: nn.Module) -> dict[str, int]:
    """Bytes of parameters, buffers and quantized weights in memory, per storage dtype, each tensor once.

    Quantized weights count under the dtype that stores them ("int8" for torch.ao qint8 and
    torchao Int8Tensor data, "int32" for torchao's packed int4), their scales under theirs.
    """
    return _count_bytes(_unique_tensors(model, set(), buffers=True))


def linear_bytes(model: nn.Module) -> int:
    """Bytes of the Linear layers inside the blocks (weights, scales, biases): what quantization shrinks."""
    gpt = _find_gpt(model)
    blocks = gpt.transformer.h if gpt is not None else model
    return sum(_count_bytes(_unique_tensors(blocks, set(), buffers=True)).values()) - sum(
        _count_bytes([t for m in blocks.modules() if isinstance(m, LayerNorm) for t in m.parameters()]).values()
    )


# ----------------------------------------------------------------------------- shares across workers


def held_parameters(model: nn.Module) -> list[tuple[str, tuple, tuple, int, int]]:
    """The parameter pieces this rank holds: (name, global offset, shape, count, bytes) each.

    A plain tensor is a whole piece (offset 0); a DTensor (FSDP2, tensor parallel) is its
    local shard, placed by its offset in the unsplit tensor. A tied weight counts once.
    """
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    out = []
    for name, p in unwrap(model).named_parameters():
        if isinstance(p, DTensor):
            _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
            local = p.to_local()
        else:
            offset, local = (0,) * p.dim(), p
        out.append((name, tuple(offset), tuple(local.shape), local.numel(), local.numel() * local.element_size()))
    return out


def summarize_shares(per_rank: list[list[tuple]], unsharded_total: int) -> dict[str, float]:
    """Per-worker parameter counts and bytes, and whether the pieces add up to the unsharded model.

    A piece held by several workers (a replicated tensor, or a tp shard that each data-parallel
    replica holds) counts once, for the lowest rank holding it (`unique_param_count`);
    `parallel/param_counts_add_up` is 1 when those add up to `unsharded_total`.
    """
    seen: set = set()
    metrics: dict[str, float] = {}
    unique_total = 0
    for rank, pieces in enumerate(per_rank):
        unique = 0
        for name, offset, shape, count, _ in pieces:
            if (name, offset, shape) not in seen:
                seen.add((name, offset, shape))
                unique += count
        metrics[f"parallel/worker{rank}/param_count"] = sum(p[3] for p in pieces)
        metrics[f"parallel/worker{rank}/param_bytes"] = sum(p[4] for p in pieces)
        metrics[f"parallel/worker{rank}/unique_param_count"] = unique
        unique_total += unique
    metrics["parallel/param_count_unsharded"] = unsharded_total
    metrics["parallel/param_count_sum_unique"] = unique_total
    metrics["parallel/param_counts_add_up"] = float(unique_total == unsharded_total)
    return metrics


def parameter_shares(model: nn.Module, unsharded_total: int) -> dict[str, float]:
    """`summarize_shares` over every worker (a collective); the metrics on rank 0, {} elsewhere."""
    pieces = held_parameters(model)
    if not dist.is_initialized():
        return summarize_shares([pieces], unsharded_total)
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, pieces)
    return summarize_shares(per_rank, unsharded_total) if dist.get_rank() == 0 else {}
