"""A seeded, resumable sampler of global batches, split over data-parallel ranks and micro-steps.

Epoch ``e`` visits the dataset in the order ``default_rng((seed, e)).permutation(N)``; step ``s``
of the epoch takes the global batch ``order[s * G : (s + 1) * G]`` (``G`` = global batch; the tail
that does not fill a global batch is dropped, as DeepSpeed's fixed global batch requires). The
global batch is cut into ``world_size * grad_accum`` micro-batches in order; rank ``r`` takes
micro-batches ``r * grad_accum + k`` for ``k = 0 .. grad_accum - 1``. So the samples of a global
batch do not depend on how it is split: one process accumulating 4 micro-batches sees the same
micro-batches as 4 ranks (or 2 ranks accumulating 2), in the same global order.

The position is ``(epoch, step)`` of the next global batch; it is all a resumed run needs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np


@dataclasses.dataclass
class MicroBatch:
    epoch: int
    step: int  # step within the epoch
    global_step: int  # steps since the start of training
    micro_step: int  # k in 0 .. grad_accum - 1 on this rank
    chunk: int  # position of this micro-batch in the global batch (0 .. world * grad_accum - 1)
    keys: list[tuple[int, int]]  # (epoch, dataset index) per sample


class GlobalBatchSampler:
    def __init__(self, num_samples: int, global_batch: int, micro_batch: int, *, world_size: int = 1,
                 rank: int = 0, seed: int = 0):
        if micro_batch < 1 or global_batch % (micro_batch * world_size):
            raise ValueError(f"global batch {global_batch} must be a multiple of micro batch x world size "
                             f"= {micro_batch} x {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if num_samples < global_batch:
            raise ValueError(f"the dataset has {num_samples} usable samples, fewer than one global batch "
                             f"({global_batch}); lower the global batch or add data")
        self.num_samples = num_samples
        self.global_batch = global_batch
        self.micro_batch = micro_batch
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.grad_accum = global_batch // (micro_batch * world_size)
        self.steps_per_epoch = num_samples // global_batch
        self._cached_epoch, self._cached_order = -1, np.empty(0, dtype=np.int64)

    def order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng((self.seed, epoch)).permutation(self.num_samples)

    def global_indices(self, epoch: int, step: int) -> np.ndarray:
        return self.order(epoch)[step * self.global_batch:(step + 1) * self.global_batch]

    def micro_batches(self, epoch: int, step: int) -> list[MicroBatch]:
        """This rank's micro-batches of global batch ``step`` of ``epoch``."""
        if self._cached_epoch != epoch:
            self._cached_order, self._cached_epoch = self.order(epoch), epoch
        indices = self._cached_order[step * self.global_batch:(step + 1) * self.global_batch]
        out = []
        for k in range(self.grad_accum):
            chunk = self.rank * self.grad_accum + k
            part = indices[chunk * self.micro_batch:(chunk + 1) * self.micro_batch]
            out.append(MicroBatch(epoch, step, epoch * self.steps_per_epoch + step, k, chunk,
                                  [(epoch, int(i)) for i in part]))
        return out

    def position(self, global_step: int) -> tuple[int, int]:
        return divmod(global_step, self.steps_per_epoch)

    def iterate(self, start_step: int, stop_step: int) -> Iterator[MicroBatch]:
        """This rank's micro-batches for global steps ``start_step .. stop_step - 1``."""
        for global_step in range(start_step, stop_step):
            epoch, step = self.position(global_step)
            yield from self.micro_batches(epoch, step)

    def state_dict(self, global_step: int) -> dict:
        epoch, step = self.position(global_step)
        return {"global_step": global_step, "epoch": epoch, "step": step, "seed": self.seed,
                "global_batch": self.global_batch, "num_samples": self.num_samples}

    def check_resumable(self, state: dict) -> None:
        """Raises if a saved position was made with a different seed, global batch or dataset size."""
        for key in ("seed", "global_batch", "num_samples"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"cannot resume the data position: the checkpoint has {key}={state[key]}, "
                                 f"this run has {getattr(self, key)}")
