"""Input validation shared by the public ops: every error names the argument and the expected form."""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Set by fastvl.testing.forbid_host_syncs(): CPU tensors are then treated as device tensors, so a CPU
# test runs the code path a GPU takes (no value checks that read tensors back).
SIMULATE_DEVICE = False


def may_read_values(value: torch.Tensor) -> bool:
    """Whether a value check may read ``value`` on the host now: only for CPU tensors (where that is
    no device sync) and never while torch.compile traces. Checks of device tensors either run on the
    device or once per tensor (see ``fastvl.ops.attention_common.check_cu_seqlens``)."""
    return value.device.type == "cpu" and not SIMULATE_DEVICE and not torch.compiler.is_compiling()


def tensor(name: str, value, *, shape: str, ndim: int | Sequence[int] | None = None,
           dtypes: Sequence[torch.dtype] | None = FLOAT_DTYPES) -> torch.Tensor:
    """Checks that ``value`` is a tensor of rank ``ndim`` and one of ``dtypes``.

    ``shape`` is the documented form (e.g. ``"[B, Lq, H, D]"``) quoted in the error.
    """
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape}, got {type(value).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if value.dim() not in allowed:
            raise ValueError(f"{name} must have shape {shape} ({' or '.join(map(str, allowed))} dims), "
                             f"got {tuple(value.shape)}")
    if dtypes is not None and value.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must have a dtype in ({names}), got {str(value.dtype).removeprefix('torch.')}")
    return value


def same_shape(name: str, value: torch.Tensor, expected: Sequence[int | None], shape: str) -> None:
    """Checks ``value.shape`` against ``expected`` (None = any size) and quotes ``shape`` on error."""
    if value.dim() != len(expected) or any(e is not None and s != e for s, e in zip(value.shape, expected)):
        want = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        raise ValueError(f"{name} must have shape {shape} = {want}, got {list(value.shape)}")


def same_device(reference_name: str, reference: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, value in others.items():
        if value is not None and value.device != reference.device:
            raise ValueError(f"{name} is on {value.device} but {reference_name} is on {reference.device}; "
                             "all inputs must be on one device")


def same_dtype(reference_name: str, reference: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, value in others.items():
        if value is not None and value.dtype != reference.dtype:
            raise TypeError(f"{name} has dtype {value.dtype} but {reference_name} has {reference.dtype}; "
                            "they must match")


def key_padding_mask(name: str, mask: torch.Tensor | None, batch: int, length: int,
                     device: torch.device) -> torch.Tensor | None:
    """Normalises a key padding mask to bool ``[B, L]`` with True = a real position.

    Accepts bool ``[B, L]`` (True = attend), or the original projects' additive float mask
    (0 = attend, a large negative value such as -10000 = padded) shaped ``[B, L]`` or ``[B, 1, 1, L]``;
    additive entries above -1 count as real positions.
    """
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a bool tensor [B, L] (True = real position), got {type(mask).__name__}")
    if mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == 1:
        mask = mask[:, 0, 0]
    if mask.dim() != 2 or mask.shape[0] != batch or mask.shape[1] != length:
        raise ValueError(f"{name} must have shape [B, L] = [{batch}, {length}] (or [B, 1, 1, L] additive), "
                         f"got {list(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device}, expected {device}")
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point():
        return mask > -1.0
    raise TypeError(f"{name} must be bool (True = real position) or an additive float mask, got {mask.dtype}")


def choice(name: str, value, allowed: Sequence) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def probability(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1), got {value!r}")
