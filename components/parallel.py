"""Where the model runs and how workers share it: device, precision, compile, DDP, FSDP2, tensor parallel.

`parallelize` is applied once, after the model is built (torchtitan's order:
compile, then the data-parallel wrapper); the model file knows nothing of
meshes and the training loop only sees the wrapped module. It needs
`torch.distributed` initialised only for more than one worker, so the same code
runs in one plain process (tests, benchmarks) and in Ray Train workers.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from components import tensor_parallel
from components.config import STRATEGIES, TENSOR_PARALLEL

# Dense bf16/fp16 tensor-core peaks (TFLOP/s, no sparsity), from NVIDIA's data sheets.
# MFU is reported against these whatever precision trains, as nanoGPT and the issue's
# baseline do, so fp32 and bf16 runs compare on one scale. Longest name first: "H100 PCIe"
# must match before "H100".
PEAK_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,  # SXM
    "H200": 989.0,
    "GH200": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 70.0,
    "A10": 125.0,
}


@dataclass(frozen=True)
class Precision:
    """What one precision name means for the loop."""

    name: str  # bf16 | fp16 | fp32
    autocast_dtype: torch.dtype | None  # None: no autocast

    @property
    def needs_grad_scaler(self) -> bool:
        return self.name == "fp16"  # fp16's narrow exponent underflows small gradients


FP32 = Precision("fp32", None)


def resolve_precision(name: str, device: torch.device) -> Precision:
    """`auto` means bf16 on a GPU and fp32 on a CPU (where bf16 autocast is slower)."""
    if name == "auto":
        name = "bf16" if device.type == "cuda" else "fp32"
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
    if name not in dtypes:
        raise ValueError(f"unknown precision {name!r}; use one of auto, {', '.join(dtypes)}")
    return Precision(name, dtypes[name])


def autocast(precision: Precision, device: torch.device):
    """The autocast context of `precision` (a no-op for fp32)."""
    if precision.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=precision.autocast_dtype)


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak in FLOP/s, or None (CPU, or a GPU not in PEAK_TFLOPS)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_TFLOPS[key] * 1e12
    return None


def configure_device(device: torch.device) -> None:
    """Process-wide settings that make matmuls fast: TF32 on NVIDIA GPUs."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def parallelize(model: nn.Module, strategy: str, device: torch.device, precision: Precision,
                compile: bool = False, tp_degree: int = 1) -> nn.Module:
    """Move `model` to `device` and wrap it for `strategy`; returns the module to train.

    Args:
        strategy: `ddp` (replicated; gradients all-reduced), `fsdp` (FSDP2 `fully_shard`
            on each block, then the root: parameters, gradients and optimizer state sharded),
            `tp` (each block's Linears split over groups of `tp_degree` ranks, see
            components/tensor_parallel.py; replicas of a group average their gradients) or
            `fsdp+tp` (a 2-D mesh: tensor parallel inside groups of `tp_degree` ranks, FSDP2
            across the groups).
        precision: under fsdp, bf16/fp16 become FSDP2's mixed-precision policy (parameters
            cast for compute, gradients reduced in fp32) instead of autocast.
        compile: torch.compile the whole model (ddp), or each block after splitting and
            before sharding (the others, as torchtitan does).
        tp_degree: ranks per tensor-parallel group (tp strategies; must divide the world size).

    Build the optimizer after this: FSDP2 and tensor parallelism replace the parameters.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    model = model.to(device)
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    if strategy in TENSOR_PARALLEL:
        mesh = _tensor_parallel_mesh(device, tp_degree)
        tensor_parallel.apply(model, mesh, grads_averaged_by_hand=strategy == "tp" and mesh["dp"].size() > 1)
    if strategy == "ddp":
        if compile:
            model = torch.compile(model)
        if distributed:
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        return model
    shard = None  # FSDP2's arguments, under fsdp and fsdp+tp
    if strategy in ("fsdp", "fsdp+tp"):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=precision.autocast_dtype, reduce_dtype=torch.float32)
        shard = dict(mp_policy=policy, mesh=mesh["dp"]) if strategy == "fsdp+tp" else dict(mp_policy=policy)
    # Each block is compiled after tensor parallelism split it and before FSDP shards it.
    blocks = model.transformer.h
    for i, block in enumerate(blocks):
        if compile:
            blocks[i] = block = torch.compile(block)
        if shard is not None and distributed:
            fully_shard(block, **shard)
    if shard is not None and distributed:
        fully_shard(model, **shard)
    return model


def _tensor_parallel_mesh(device: torch.device, tp_degree: int):
    """The (dp, tp) DeviceMesh: consecutive ranks form a tp group (on one node, where links are fastest)."""
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        raise ValueError("tensor parallelism needs torch.distributed initialised (Ray Train does it), "
                         "even for one worker")
    world = dist.get_world_size()
    if tp_degree <= 0 or world % tp_degree:
        raise ValueError(f"tp_degree {tp_degree} does not divide the {world} workers")
    return init_device_mesh(device.type, (world // tp_degree, tp_degree), mesh_dim_names=("dp", "tp"))


def tensor_parallel_layout(model: nn.Module) -> tensor_parallel.Layout | None:
    """How `model` was split by tensor parallelism, or None when it was not."""
    return getattr(unwrap(model), tensor_parallel.ATTRIBUTE, None)


def data_parallel_size(model: nn.Module) -> int:
    """Workers that train on different rows: all of them, except that a tp group shares its rows."""
    layout = tensor_parallel_layout(model)
    if layout is not None:
        return layout.dp_size
    return dist.get_world_size() if dist.is_initialized() else 1


def uses_autocast(model: nn.Module, precision: Precision) -> bool:
    """FSDP2 applies bf16/fp16 through its policy; everything else autocasts."""
    return precision.autocast_dtype is not None and not is_fsdp(model)


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """Skip the gradient all-reduce / reduce-scatter on all but the last micro-step of a step.

    Pure tp with several replicas has no DDP to do it: the gradients are averaged by hand
    when the last micro-step's backward (inside this context) is done.
    """
    layout = tensor_parallel_layout(model)
    if layout is not None and layout.grads_averaged_by_hand:
        yield
        if enabled:
            tensor_parallel.average_gradients(model, layout)
        return
    if enabled:
        yield
    elif is_fsdp(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    elif hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    else:
        yield


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip the gradients of `params` to a global norm of `max_norm` (0: do not clip); returns that
    norm as a plain tensor, still on the device.

    Gradients are grouped by the mesh they live on: torch's own clip_grad_norm_ refuses to
    mix meshes, and fsdp+tp has split layers on the (dp, tp) mesh and whole ones on dp.
    Sharded groups give their full norm (`full_tensor`); whole ones count once.
    """
    groups: dict = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault(getattr(p.grad, "device_mesh", None), []).append(p)
    if not groups:
        return torch.zeros(())
    norms = []
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group])
        norms.append(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    total = torch.linalg.vector_norm(torch.stack(norms))
    if max_norm > 0:
        for group in groups.values():
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


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


def mixed_tensors(model: nn.Module):
    """Context for gradient clipping and the optimizer step over all of `model`'s parameters.

    Under tensor parallelism some parameters are split DTensors and the others (embeddings,
    layer norms) plain tensors, whole on every rank; DTensor refuses foreach ops that mix the
    two unless the plain ones count as replicated, which they are.
    """
    if tensor_parallel_layout(model) is None:
        return contextlib.nullcontext()
    from torch.distributed.tensor.experimental import implicit_replication

    return implicit_replication()


def unwrap(model: nn.Module) -> nn.Module:
    """The plain GPT inside DDP and torch.compile wrappers (FSDP2 wraps in place)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner
