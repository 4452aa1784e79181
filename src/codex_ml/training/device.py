"""Devices, mixed precision and the peak FLOP/s that MFU is measured against."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from functools import partial

import torch

from codex_ml.errors import CodexError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Dense peak TFLOP/s per GPU (without sparsity), by name fragment: bf16/fp16 tensor cores, TF32 tensor
# cores (half the bf16 rate; None before Ampere, which has none), and plain fp32 on CUDA cores.
_PEAK_TFLOPS = [
    ("H200", 989.0, 494.5, 67.0),
    ("H100", 989.0, 494.5, 67.0),
    ("A100", 312.0, 156.0, 19.5),
    ("L40S", 362.0, 181.0, 91.6),
    ("A10G", 125.0, 62.5, 31.2),
    ("RTX 4090", 165.0, 82.6, 82.6),
    ("L4", 121.0, 60.5, 30.3),
    ("V100", 125.0, None, 15.7),
    ("T4", 65.0, None, 8.1),
]


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


def autocast_factory(device: torch.device, precision: str) -> Callable[[], contextlib.AbstractContextManager]:
    """A zero-argument context-manager factory: autocast for bf16/fp16, nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext
    if device.type == "cpu" and precision == "fp16":
        raise DeviceError("training.precision=fp16 needs a GPU; use bf16 or fp32 on CPU")
    return partial(torch.autocast, device_type=device.type, dtype=DTYPES[precision])


def fp32_matmul_precision(device: torch.device, precision: str) -> str | None:
    """The ``torch.set_float32_matmul_precision`` a run should use: "high" (TF32 tensor cores) for fp32
    training on CUDA, where the default "highest" would run matmuls several times slower than the
    hardware allows; None (leave it alone) otherwise, since bf16/fp16 matmuls never use it."""
    return "high" if device.type == "cuda" and precision == "fp32" else None


def configure_matmul_precision(device: torch.device, precision: str) -> str:
    """Apply :func:`fp32_matmul_precision` to this process; the fp32 matmul precision now in effect."""
    wanted = fp32_matmul_precision(device, precision)
    if wanted is not None:
        torch.set_float32_matmul_precision(wanted)
    return torch.get_float32_matmul_precision()


def peak_flops_of(device_name: str, precision: str, matmul_precision: str) -> float:
    """Peak FLOP/s of a GPU named ``device_name`` for matmuls in ``precision``; 0 when the GPU is unlisted.

    fp32 matmuls run on TF32 tensor cores under ``matmul_precision`` "high" or "medium" where the GPU
    has them, and on plain fp32 units under "highest" (or without TF32): MFU is measured against the
    rate actually used.
    """
    for fragment, tensor_tflops, tf32_tflops, fp32_tflops in _PEAK_TFLOPS:
        if fragment in device_name:
            if precision != "fp32":
                return tensor_tflops * 1e12
            if matmul_precision == "highest" or tf32_tflops is None:
                return fp32_tflops * 1e12
            return tf32_tflops * 1e12
    return 0.0


def peak_flops(device: torch.device, precision: str) -> float:
    """Peak FLOP/s of one device for MFU, at this process's fp32 matmul precision; 0 when unknown (CPUs,
    unlisted GPUs)."""
    if device.type != "cuda":
        return 0.0
    return peak_flops_of(torch.cuda.get_device_name(device), precision, torch.get_float32_matmul_precision())
