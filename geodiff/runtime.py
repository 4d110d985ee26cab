"""Device choice, mixed precision and torchrun (DDP) process-group helpers."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


def resolve_device(device: str | None = None) -> torch.device:
    """``None``/``"auto"``: CUDA when available, else CPU; otherwise the named device.

    Under torchrun each rank uses ``cuda:LOCAL_RANK``, for ``auto`` and for a bare ``cuda``
    alike (an explicit index is kept).
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"device={device!r} is not a device; use 'auto', 'cpu', 'cuda' or "
                         "'cuda:N'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} requested but CUDA is not available here; "
                         "use --device cpu (or auto)")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)  # one GPU per rank, not all on GPU 0
    return dev


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bf16 natively (CUDA compute capability >= 8.0, Ampere
    on). ``torch.cuda.is_bf16_supported()`` also says yes for emulated bf16 (V100, T4),
    which is slower than float32 there."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def uses_bf16(device: torch.device, amp: str) -> bool:
    """Whether ``amp`` (off/auto/bf16) means bf16 autocast on ``device``; a ValueError for
    ``amp='bf16'`` on a device without native bf16.

    Mixed precision is never used on CPU (slower there, and it would change results).
    """
    if amp == "bf16" and device.type != "cuda":
        raise ValueError(f"amp='bf16' needs a CUDA device, got {device}; use amp: auto")
    if amp == "off" or device.type != "cuda":
        return False
    if not native_bf16(device):
        if amp == "bf16":
            raise ValueError(f"amp='bf16' but {torch.cuda.get_device_name(device)} has no "
                             "native bf16 (compute capability < 8.0); use amp: auto or off")
        return False
    return True


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """bf16 autocast where :func:`uses_bf16`, else a no-op context."""
    if uses_bf16(device, amp):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass(frozen=True)
class Dist:
    """This process's place in a (possibly single-process) job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed(device: torch.device) -> Dist:
    """Join the torchrun process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # nccl's collectives run on the current device
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(),
                local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def barrier(d: Dist | None) -> None:
    """Wait for every rank (a no-op in a single process)."""
    if d is not None and d.enabled:
        dist.barrier()
