"""Evaluation split over data-parallel ranks: each rank scores an equal share, the results are gathered."""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class EvalContext:
    """Where and how a task evaluates: this rank of ``world``, the model's device and float dtype,
    the batch size per forward."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    batch_size: int = 64

    def to_device(self, batch: dict) -> dict:
        out = {}
        for key, value in batch.items():
            if isinstance(value, torch.Tensor):
                value = value.to(self.device, dtype=self.dtype if value.is_floating_point() else value.dtype)
            out[key] = value
        return out


def share(count: int, rank: int, world: int) -> tuple[list[int], int]:
    """``(indices, real)``: rank's contiguous share of ``range(count)``, every share the same length
    (the last index repeated; ZeRO-3 needs every rank to run the same forwards); the first ``real``
    entries are its own."""
    per_rank = -(-count // world) if count else 0
    start = min(count, rank * per_rank)
    own = list(range(start, min(count, start + per_rank)))
    padding = [own[-1] if own else max(0, count - 1)] * (per_rank - len(own))
    return own + padding, len(own)


def gather(values: list, ctx: EvalContext) -> list:
    """Concatenates every rank's list in rank order (itself on one rank)."""
    if ctx.world == 1:
        return list(values)
    import torch.distributed as dist

    parts: list = [None] * ctx.world
    dist.all_gather_object(parts, list(values))
    return [v for part in parts for v in part]


def batches(indices: list[int], size: int):
    for start in range(0, len(indices), size):
        yield indices[start:start + size]
