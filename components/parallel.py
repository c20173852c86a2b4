"""How workers share the model: compile, DDP, FSDP2, tensor parallel, and the queries the loop asks of the result.

`parallelize` is applied once, after the model is built (torchtitan's order:
compile, then the data-parallel wrapper); the model file knows nothing of
meshes and the training loop only sees the wrapped module. It needs
`torch.distributed` initialised only for more than one worker, so the same code
runs in one plain process (tests, benchmarks) and in Ray Train workers.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from components import tensor_parallel
from components.config import STRATEGIES, TENSOR_PARALLEL
from components.devices import Precision


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


def gather_from_ranks(obj) -> list:
    """`obj` of every rank, in rank order (a collective: every rank calls it); [obj] without torch.distributed."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


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
