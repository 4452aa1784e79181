"""FSDP2 for the native loop: ``fully_shard`` per block and at the root, as torchtitan applies it.

Each transformer block is one unit (its parameters are all-gathered just before its forward and
freed after it, unless ``reshard_after_forward`` is off), and the root holds what is left (the
embeddings, the final norm, the output head). Parameters follow ``training.precision``: bf16
parameters with fp32 gradient reduction for bf16 (fp16 likewise), fp32 throughout for fp32.
A native model trained from scratch starts on the meta device and is materialised shard by
shard (:func:`materialize_native`), so no rank ever holds the whole model.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from codex_ml.models.gpt import GPT
from codex_ml.training.checkpoint import copy_into

_PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def mixed_precision_policy(precision: str) -> MixedPrecisionPolicy:
    """Low-precision parameters for compute, gradients reduced in fp32 (the sum of many small
    low-precision gradients loses digits); fp32 keeps everything in fp32."""
    dtype = _PRECISION_DTYPES.get(precision)
    if dtype is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def device_mesh(device: torch.device) -> DeviceMesh:
    """A one-dimensional mesh over every rank of the job (gloo on CPU, NCCL on CUDA)."""
    return init_device_mesh(device.type, (dist.get_world_size(),))


def sharding_units(model: nn.Module) -> list[nn.Module]:
    """The modules sharded one by one: the native decoder's blocks, or a Hugging Face model's
    decoder layers (the classes it names in ``_no_split_modules``)."""
    native = next((m for m in model.modules() if isinstance(m, GPT)), None)  # inside PEFT's wrapper too
    if native is not None:
        return list(native.layers)
    names = {n for m in model.modules() for n in (getattr(m, "_no_split_modules", None) or [])}
    units = [m for m in model.modules() if type(m).__name__ in names]
    if not units:
        raise ValueError(
            f"{type(model).__name__} names no decoder layer class (_no_split_modules): "
            "training.strategy=fsdp cannot find the units to shard it by"
        )
    return units


def shard_model(
    model: nn.Module,
    native: GPT | None,
    on_meta: bool,
    device: torch.device,
    precision: str,
    reshard_after_forward: bool,
    compile_blocks: bool,
) -> nn.Module:
    """Shard a built model over every rank and give it its initial weights; returns it (sharded in place).

    A model made on the meta device (``on_meta``, a native model from scratch) is sharded first and
    materialised after, shard by shard; any other (weights loaded from ``model.path``, LoRA) was
    built whole on each host and takes rank 0's weights before it is sharded.
    """
    if not on_meta:
        broadcast_module(model)
    checkpointing = native is not None and native.gradient_checkpointing
    if native is not None:
        native.gradient_checkpointing = False  # per block, inside each unit's FSDP hooks, instead
    apply_fsdp(model, device_mesh(device), precision, reshard_after_forward, checkpointing, compile_blocks)
    if on_meta:
        assert native is not None  # only a native model is made on the meta device
        materialize_native(native, device)
    return model


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh,
    precision: str,
    reshard_after_forward: bool,
    activation_checkpointing: bool = False,
    compile_blocks: bool = False,
) -> nn.Module:
    """Shard ``model`` in place: activation checkpointing and torch.compile per block first, then
    ``fully_shard`` per block and at the root (torchtitan's order: AC, compile, FSDP).

    Compiling a block's ``forward`` (not the module) keeps the FSDP hooks outside the graph and the
    parameter names free of ``_orig_mod``, so checkpoints keep the model's own names.
    """
    policy = mixed_precision_policy(precision)
    units = sharding_units(model)
    for unit in units:
        if activation_checkpointing:
            _checkpoint_forward(unit)
        if compile_blocks:
            unit.forward = torch.compile(unit.forward)
        fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    # the root's parameters are gathered again at once for the backward pass: FSDP keeps them
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def _checkpoint_forward(unit: nn.Module) -> None:
    """Recompute the unit's activations in backward: its forward runs under ``checkpoint``, inside
    the FSDP hooks (so the recomputation sees gathered parameters) and without renaming anything."""
    from torch.utils.checkpoint import checkpoint

    forward = unit.forward

    def checkpointed(*args: Any, **kwargs: Any) -> Any:
        if not unit.training:
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    unit.forward = checkpointed


@contextlib.contextmanager
def no_gradient_sync(model: nn.Module) -> Iterator[None]:
    """FSDP2's counterpart of DDP's ``no_sync``: micro-batches before the last keep their gradients local."""
    assert isinstance(model, FSDPModule)
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def materialize_native(model: GPT, device: torch.device) -> None:
    """Allocate a meta-device, already sharded native decoder on ``device`` and initialise it.

    Each parameter is drawn whole on the host, one tensor at a time, from the random stream rank 0
    had when the model was made, consumed as making the model on the host consumes it (torch's
    layers initialise themselves when constructed, then ``GPT.reset_parameters``); each rank keeps
    its shard. The weights equal a one-process run's bit for bit, rank 0's stream ends where that
    run's does, and the host never holds more than one layer whole.
    """
    model.to_empty(device=device)
    own = torch.get_rng_state()
    shared = [own]
    if dist.is_initialized():
        dist.broadcast_object_list(shared, src=0)
    torch.set_rng_state(shared[0])
    for m in model.modules():  # construction order: what GPT.__init__ draws before reset_parameters
        if isinstance(m, nn.Linear):
            nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        elif isinstance(m, nn.Embedding):
            nn.Embedding(m.num_embeddings, m.embedding_dim, padding_idx=m.padding_idx)
    std = model.config.init_std
    resid_std = std / math.sqrt(2 * model.config.n_layer)
    with torch.no_grad():
        for name, p in model.named_parameters():  # GPT.reset_parameters' order and rules
            full = torch.empty(p.shape, dtype=torch.float32)
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(full, mean=0.0, std=resid_std)
            elif p.dim() >= 2:
                nn.init.normal_(full, mean=0.0, std=std)
            else:
                nn.init.ones_(full)
            copy_into(p, full)
    if dist.is_initialized() and dist.get_rank() != 0:
        torch.set_rng_state(own)  # the other ranks keep their own streams (seeded seed + rank)
    model.reset_buffers()


def broadcast_module(model: nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank, before sharding (DDP does the same at
    construction): ranks seeded differently, or loading weights, start from one model."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, src=0)
