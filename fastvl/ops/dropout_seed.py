"""Philox seeds for the fused ops' dropout, many drawn in one launch.

Every fused op with dropout (attention, co-attention, residual + dropout + LayerNorm) reads an int64
``[1]`` seed tensor on its device. Drawn per call (``torch.randint``), that is one device launch per
op call: 84 of a ViLBERT-base training step's ~1,000. Inside :func:`shared_seeds` (a model's forward
opens it) the ops instead take views of one tensor of ``SEEDS_PER_DRAW`` seeds drawn from torch's
generator at the first request (another when it runs out): no launch per call.

What stays true:

* Determinism: the seeds depend only on torch's generator state when the scope opens and on the
  order of the calls inside it, the same as the per-call draws.
* Exact resume: a scope lives for one forward (a pool is never carried over to the next one), so
  torch's RNG state saved at a step boundary is all a resumed run needs; nothing to checkpoint.
* Activation checkpointing: :func:`checkpoint_contexts` records the seeds a checkpointed layer's
  forward took and hands the same ones to its recomputation (which runs in the backward, outside
  the scope; torch's RNG replay only covers per-call draws).
* torch.compile and CUDA graph capture draw per call as before: :func:`shared_seeds` opens nothing
  while compiling (the trace sees no Python state that changes per call, so no recompiles), and a
  call on a capturing stream draws its own seed (a pool drawn before the capture would freeze its
  seeds into every replay).
* Outside a scope (a user calling ``fastvl.ops.attention`` directly) each op draws as it always did.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

SEED_HIGH = 2**62  # pool seeds: uniform int64 in [0, 2**62); co-attention also uses seed + 1
SEEDS_PER_DRAW = 256  # one draw covers ViLBERT-base (84 per forward) and models 3x its depth
# seeds 16 bytes apart: Triton specialises pointers on 16-byte alignment, and a seed at an odd int64
# index would compile every dropout kernel a second time
SEED_STRIDE = 2


class _SeedPool:
    """The seeds one scope hands out: per device, the tensor drawn last and the next unused index."""

    def __init__(self):
        self.drawn: dict[torch.device, tuple[torch.Tensor, int]] = {}

    def take(self, device: torch.device) -> torch.Tensor:
        seeds, index = self.drawn.get(device, (None, SEEDS_PER_DRAW))
        if index == SEEDS_PER_DRAW:
            seeds = torch.randint(0, SEED_HIGH, (SEEDS_PER_DRAW, SEED_STRIDE), dtype=torch.int64, device=device)
            index = 0
        self.drawn[device] = (seeds, index + 1)
        return seeds[index, :1]


class _State(threading.local):
    def __init__(self):
        self.pool: _SeedPool | None = None
        self.record: list[torch.Tensor] | None = None  # a checkpointed forward's seeds, in call order
        self.replay: Iterator[torch.Tensor] | None = None  # the same seeds for its recomputation


_state = _State()


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def next_seed(device: torch.device, high: int = SEED_HIGH) -> torch.Tensor:
    """A fresh int64 ``[1]`` seed on ``device``: replayed inside a checkpointed layer's recomputation,
    a view of the scope's pool inside :func:`shared_seeds`, else its own ``torch.randint(0, high)``
    draw (one launch; also under torch.compile and on a capturing CUDA stream). No host sync."""
    if torch.compiler.is_compiling() or _capturing(device):
        return torch.randint(0, high, (1,), dtype=torch.int64, device=device)
    if _state.replay is not None:
        seed = next(_state.replay, None)
        if seed is None:
            raise RuntimeError("a checkpointed layer's recomputation asked for more dropout seeds than its "
                               "forward took (its calls differ between the forward and the recomputation)")
    elif _state.pool is not None:
        seed = _state.pool.take(device)
    else:
        return torch.randint(0, high, (1,), dtype=torch.int64, device=device)
    if _state.record is not None:
        _state.record.append(seed)
    return seed


@contextlib.contextmanager
def _scope() -> Iterator[None]:
    _state.pool = _SeedPool()
    try:
        yield
    finally:
        _state.pool = None


def shared_seeds():
    """Context manager: the fused ops' dropout seeds inside come from one pool (a model's forward).
    Nested scopes share the outer one; under torch.compile it does nothing."""
    if torch.compiler.is_compiling() or _state.pool is not None:
        return contextlib.nullcontext()
    return _scope()


def pooling() -> bool:
    """Whether ops called now take their seeds from a :func:`shared_seeds` pool (False when compiling)."""
    return not torch.compiler.is_compiling() and _state.pool is not None


class _Recording:
    """Forward context of a checkpointed layer: the pool seeds it takes are appended to ``seeds``."""

    def __init__(self, seeds: list[torch.Tensor]):
        self.seeds, self.outer = seeds, None

    def __enter__(self):
        self.outer, _state.record = _state.record, self.seeds

    def __exit__(self, *exc):
        _state.record = self.outer
        if self.outer is not None:
            self.outer.extend(self.seeds)  # an enclosing checkpointed layer replays these too


class _Replaying:
    """Recomputation context (entered once per recomputation): hands out ``seeds`` in order."""

    def __init__(self, seeds: list[torch.Tensor]):
        self.seeds, self.outer = seeds, None

    def __enter__(self):
        self.outer, _state.replay = _state.replay, iter(self.seeds)

    def __exit__(self, *exc):
        _state.replay = self.outer


def checkpoint_contexts() -> tuple[_Recording, _Replaying]:
    """``torch.utils.checkpoint``'s ``context_fn`` for a layer run inside :func:`shared_seeds`: the
    forward records the pool seeds it takes, each recomputation replays them in order."""
    seeds: list[torch.Tensor] = []
    return _Recording(seeds), _Replaying(seeds)
