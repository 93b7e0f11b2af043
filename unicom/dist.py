"""torch.distributed helpers: one code path for a single process and for ``torchrun`` launches."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as td


@dataclass(frozen=True)
class DistInfo:
    """Rank, world size, local rank and the device this process uses."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the process that writes shared files and prints)."""
        return self.rank == 0


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``"auto"`` -> the local CUDA device when present, else the CPU; otherwise ``torch.device(device)``."""
    if device == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{local_rank}")
    return dev


def setup(device: str = "auto", timeout_hours: float | None = None) -> DistInfo:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1); a no-op otherwise.

    Uses NCCL for CUDA devices and Gloo for the CPU. ``timeout_hours`` raises the collective
    timeout for steps where ranks wait on one another's long work (rank 0 training k-means).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not td.is_initialized():
        kwargs = {"timeout": timedelta(hours=timeout_hours)} if timeout_hours else {}
        td.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", **kwargs)
    if td.is_initialized():
        rank, world = td.get_rank(), td.get_world_size()
    return DistInfo(rank, world, local_rank, dev)


def barrier() -> None:
    """Synchronise all ranks (no-op in a single process)."""
    if td.is_initialized() and td.get_world_size() > 1:
        td.barrier()


def cleanup() -> None:
    """Leave the process group if this module joined one."""
    if td.is_initialized():
        td.destroy_process_group()
