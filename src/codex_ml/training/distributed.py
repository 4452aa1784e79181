"""torchrun integration: rank and world size from the environment, DDP wrapping, sums across ranks.

A single process is world size 1 and none of this does anything. Under ``torchrun`` every rank
trains on its shard of the batches and only rank 0 writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Distributed:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def gather_objects(self, obj: object) -> list:
        """Every rank's ``obj``, in rank order, on every rank (picklable objects: loader and RNG states)."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def agree_on_signal(self, signum: int | None) -> int | None:
        """The signal any rank received (the largest number if several did), or None: the same on every
        rank. A collective: every rank calls it at the same step."""
        if not self.enabled:
            return signum
        # a CPU tensor for gloo; NCCL reduces only CUDA tensors
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        flag = torch.tensor([signum or 0], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None


def init_distributed(device_type: str) -> Distributed:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, store=_attempt_store(), rank=rank, world_size=world)
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    return Distributed(rank, local_rank, world)


def _attempt_store() -> dist.Store:
    """The process group's key-value store, with keys of their own for each torchrun restart.

    torchrun (c10d rendezvous) shares its own TCPStore with the workers and keeps it across the
    restarts of ``--max-restarts``: a restarted group would read the addresses its dead
    predecessors published (gloo: "Connection refused" to a port no one listens on; NCCL: a stale
    unique id) whenever it reads a peer's key before that peer wrote it again. One agent restarts
    all of its workers together, so ``TORCHELASTIC_RESTART_COUNT`` is the same on every rank of a
    node; across nodes use a fresh store per round instead (``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``,
    as scripts/slurm/train.sbatch does), where torchrun says so with USE_AGENT_STORE=False.
    """
    store, _, _ = next(dist.rendezvous("env://"))
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return store
    return dist.PrefixStore(f"codex-ml/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def wrap_ddp(model: torch.nn.Module, d: Distributed, device: torch.device) -> torch.nn.Module:
    if not d.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def resolve_strategy(strategy: str, d: Distributed) -> str:
    """``training.strategy`` for this launch: ``auto`` is none on one process and ddp on several."""
    if strategy == "auto":
        return "ddp" if d.enabled else "none"
    return strategy
