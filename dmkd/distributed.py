"""torch.distributed helpers that also work when no process group is initialised."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True where more than one process trains together.

    A one-process group (a one-worker Ray Train trial) counts as not distributed: no DDP wrapper and no
    collectives. Besides saving the all-reduce, this keeps gloo's helper threads from starting OpenMP
    thread teams of their own, which on a machine with few cores makes libgomp throttle its spin-waits
    and halves the speed of the training loop (BENCHMARKS.md, orchestration overhead).
    """
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def join_torchrun_group(device: str) -> bool:
    """Join the process group that ``torchrun`` describes in the environment (WORLD_SIZE, RANK,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT): NCCL with one GPU per local rank when training on CUDA,
    gloo on CPU. True when this call created the group (the caller destroys it); False outside
    torchrun, for a one-process torchrun, or where a group exists already (Ray Train made it)."""
    if dist.is_initialized() or "LOCAL_RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return False
    on_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if on_cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if on_cuda else "gloo")
    return True


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average each value over all ranks (every rank must pass the same keys)."""
    if not is_distributed() or not values:
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return {k: v / world_size() for k, v in zip(keys, tensor.tolist())}


def gather_to_main(items: list) -> list | None:
    """Concatenate every rank's list on rank 0; other ranks get None."""
    if not is_distributed():
        return items
    gathered = [None] * world_size() if is_main() else None
    dist.gather_object(items, gathered, dst=0)
    return [item for part in gathered for item in part] if is_main() else None


def broadcast_from_main(obj):
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
