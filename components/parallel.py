"""Where the model runs and how workers share it: device, precision, compile, DDP or FSDP2.

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

STRATEGIES = ("ddp", "fsdp")

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
                compile: bool = False) -> nn.Module:
    """Move `model` to `device` and wrap it for `strategy`; returns the module to train.

    Args:
        strategy: `ddp` (replicated; gradients all-reduced) or `fsdp` (FSDP2 `fully_shard`
            on each block, then the root: parameters, gradients and optimizer state sharded).
        precision: under fsdp, bf16/fp16 become FSDP2's mixed-precision policy (parameters
            cast for compute, gradients reduced in fp32) instead of autocast.
        compile: torch.compile the whole model (ddp), or each block before sharding (fsdp,
            as torchtitan does).

    Build the optimizer after this: FSDP2 replaces the parameters with sharded ones.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    model = model.to(device)
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    if strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=precision.autocast_dtype, reduce_dtype=torch.float32)
        blocks = model.transformer.h
        for i, block in enumerate(blocks):
            if compile:
                block = torch.compile(block)
                blocks[i] = block
            if distributed:
                fully_shard(block, mp_policy=policy)
        if distributed:
            fully_shard(model, mp_policy=policy)
        return model
    if compile:
        model = torch.compile(model)
    if distributed:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def uses_autocast(model: nn.Module, precision: Precision) -> bool:
    """FSDP2 applies bf16/fp16 through its policy; everything else autocasts."""
    return precision.autocast_dtype is not None and not is_fsdp(model)


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """Skip the gradient all-reduce / reduce-scatter on all but the last micro-step of a step."""
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


def unwrap(model: nn.Module) -> nn.Module:
    """The plain GPT inside DDP and torch.compile wrappers (FSDP2 wraps in place)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner
