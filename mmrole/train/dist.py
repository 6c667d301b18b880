"""Collectives the training recipes use (torch.distributed only: the process group Ray Train created)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def broadcast(obj: Any, device: torch.device) -> Any:
    """Rank 0's ``obj`` on every rank (picklable objects; tensors go through the device on CUDA)."""
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
    return box[0]


def allreduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of ``values`` over ranks (float64)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()
