"""NVTX ranges: named spans in an Nsight Systems timeline on CUDA machines, free no-ops elsewhere."""

from __future__ import annotations

import contextlib
import functools

import torch


@functools.cache
def _cuda() -> bool:
    return torch.cuda.is_available()


def nvtx_range(name: str):
    """A context manager marking ``name`` in the profile; nothing without CUDA or while torch.compile traces."""
    if _cuda() and not torch.compiler.is_compiling():
        return torch.cuda.nvtx.range(name)
    return contextlib.nullcontext()
