"""Devices, mixed precision and the peak FLOP/s that MFU is measured against."""

from __future__ import annotations

import contextlib
from functools import partial

import torch

from codex_ml.errors import CodexError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Dense peak TFLOP/s per GPU for bf16/fp16 tensor cores (without sparsity), by name fragment.
_PEAK_TFLOPS = [("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0), ("A10G", 125.0),
                ("RTX 4090", 165.0), ("L4", 121.0), ("V100", 125.0), ("T4", 65.0)]


class DeviceError(CodexError):
    pass


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without it is an error, not a fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"model.device={name}: CUDA is not available on this machine (torch {torch.__version__})")
        index = int(name.split(":", 1)[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise DeviceError(f"model.device={name}: only {torch.cuda.device_count()} CUDA device(s)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise DeviceError("model.device=mps: MPS is not available on this machine")
    return torch.device(name)


def autocast_factory(device: torch.device, precision: str):
    """A zero-argument context-manager factory: autocast for bf16/fp16, nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext
    if device.type == "cpu" and precision == "fp16":
        raise DeviceError("training.precision=fp16 needs a GPU; use bf16 or fp32 on CPU")
    return partial(torch.autocast, device_type=device.type, dtype=DTYPES[precision])


def peak_flops(device: torch.device, precision: str) -> float:
    """Peak FLOP/s of one device for MFU; 0 when unknown (CPUs, unlisted GPUs)."""
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    for fragment, tflops in _PEAK_TFLOPS:
        if fragment in name:
            # fp32 runs on TF32 tensor cores at about half the bf16 rate
            return tflops * 1e12 * (0.5 if precision == "fp32" else 1.0)
    return 0.0
