"""How a Triton kernel is described for ahead-of-time compilation (see ``python -m fastvl.aot``)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class AotSpec:
    """One launch configuration of a kernel.

    ``signature`` maps every argument to its Triton type (``"*fp16"``, ``"i32"``, ``"fp32"``,
    ``"constexpr"``); ``constexprs`` gives the constexpr values. ``uses_dot``: the kernel's inner loop
    is a ``tl.dot``, so on sm_90 its PTX is expected to use ``wgmma``.
    """

    name: str
    kernel: object
    signature: dict[str, str]
    constexprs: dict[str, object]
    num_warps: int = 4
    num_stages: int = 3
    uses_dot: bool = False
