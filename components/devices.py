"""What the device computes with: the precision a run trains in, TF32, and the peak FLOP/s MFU is taken against."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

# Dense bf16/fp16 tensor-core peaks (TFLOP/s, no sparsity), from NVIDIA's data sheets.
# MFU is reported against these whatever precision trains, as nanoGPT does, so fp32 and
# bf16 runs compare on one scale. Longest name first: "H100 PCIe" must match before "H100".
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
