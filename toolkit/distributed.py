"""torch.distributed for training under `torchrun`: process group, device choice, a weight-sync check."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from dtk.runtime.errors import DtkError


@dataclass(frozen=True)
class Context:
    """Where this process sits: rank 0 of 1 outside torchrun."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def select_device(requested: str, local_rank: int = 0) -> torch.device:
    """`auto`: CUDA (this process's local GPU under torchrun), then Apple MPS, then CPU."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise DtkError(f"unknown device {requested!r}; use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DtkError(f"device {requested!r} requested but CUDA is not available here")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DtkError("device 'mps' requested but Apple MPS is not available here")
    return device


def setup(requested_device: str) -> tuple[Context, torch.device]:
    """Join the process group when launched by torchrun (nccl on CUDA, gloo otherwise) and pick the device."""
    if not launched_by_torchrun():
        return Context(), select_device(requested_device)
    import torch.distributed as dist

    ctx = Context(
        int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    )
    device = select_device(requested_device, ctx.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return ctx, device


def teardown(ctx: Context) -> None:
    if ctx.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def check_in_sync(ctx: Context, model: torch.nn.Module, device: torch.device) -> None:
    """Every rank must hold the same weights; compare a per-tensor checksum across ranks (a collective)."""
    if not ctx.distributed:
        return
    import torch.distributed as dist

    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).to(device)
    gathered = [torch.empty_like(checksum) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, checksum)
    for rank, other in enumerate(gathered):
        if not torch.equal(other, gathered[0]):
            raise DtkError(f"distributed training diverged: rank {rank}'s weights differ from rank 0's")


def any_rank(ctx: Context, flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on any (a collective under torchrun): ranks stop together."""
    if not ctx.distributed:
        return flag
    import torch.distributed as dist

    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
