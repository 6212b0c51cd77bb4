"""Profiling annotations, in one place: named ranges that Nsight Systems (NVTX, on CUDA) and
``torch.profiler`` (``record_function``) both show, per code block, per layer and per op call.

* :func:`nvtx_range` - one NVTX range around a block (models and the trainer mark their phases).
* :func:`nvtx_layer_ranges` - permanent NVTX ranges around every layer held in a ``ModuleList``
  (``fastvl pretrain`` installs them on CUDA).
* :func:`annotate` - inside a block, every layer of a model and every fastvl op call (through
  :func:`fastvl.dispatch.listen`, naming the backend chosen) runs in a range both tools show.

All are free no-ops where they do not apply (no CUDA, or while torch.compile traces).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch
from torch import nn

from fastvl import dispatch


@functools.cache
def _cuda() -> bool:
    return torch.cuda.is_available()


def nvtx_range(name: str):
    """A context manager marking ``name`` in the profile; nothing without CUDA or while torch.compile traces."""
    if not torch.compiler.is_compiling() and _cuda():
        return torch.cuda.nvtx.range(name)
    return contextlib.nullcontext()


class Range:
    """One named range for both tools: a torch.profiler ``record_function`` and an NVTX range (CUDA)."""

    def __init__(self, name: str):
        self.contexts = [torch.autograd.profiler.record_function(name), nvtx_range(name)]

    def __enter__(self):
        for context in self.contexts:
            context.__enter__()
        return self

    def __exit__(self, *exc):
        for context in reversed(self.contexts):
            context.__exit__(*exc)


def nvtx_layer_ranges(model: nn.Module, enabled: bool | None = None) -> int:
    """Wraps the forward of every layer held in a ``ModuleList`` (``bert.layer.3``, ``bert.c_layer.0``,
    ...) in an NVTX range named after it, so a profile shows the forward per layer. Only on CUDA
    machines unless ``enabled``; returns the number of layers instrumented."""
    if not (torch.cuda.is_available() if enabled is None else enabled):
        return 0
    count = 0
    for parent_name, parent in model.named_modules():
        if not isinstance(parent, nn.ModuleList):
            continue
        for index, layer in enumerate(parent):
            name = f"forward {parent_name}.{index}"
            layer.register_forward_pre_hook(lambda *_, name=name: torch.cuda.nvtx.range_push(name))
            layer.register_forward_hook(lambda *_: torch.cuda.nvtx.range_pop())
            count += 1
    return count


def layer_modules(model: nn.Module) -> dict[str, nn.Module]:
    """{qualified name: module} of a model's blocks: the modules inside a ``ModuleList`` and the other
    blocks beside them (embeddings, poolers, head transforms); containers and modules holding a
    ``ModuleList`` somewhere inside are opened. ``fastvl parity`` reports on these blocks."""
    found: dict[str, nn.Module] = {}

    def is_container(module: nn.Module) -> bool:
        return (type(module).forward is nn.Module.forward or isinstance(module, (nn.ModuleList, nn.ModuleDict))
                or any(isinstance(inner, nn.ModuleList) for inner in module.modules()))

    def visit(prefix: str, module: nn.Module, in_list: bool) -> None:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if in_list or not is_container(child):
                found[full] = child
            else:
                visit(f"{full}.", child, isinstance(child, nn.ModuleList))

    visit("", model, False)
    return found


def op_range_name(event: dispatch.Dispatched, prefix: str = "") -> str:
    return f"{prefix}op {event.op} [{event.backend}]"


@contextlib.contextmanager
def annotate(model: nn.Module, prefix: str = "") -> Iterator[None]:
    """Inside the block, every layer of ``model`` (see :func:`layer_modules`) and every fastvl op call
    runs in a named :class:`Range` (ops as ``op NAME [BACKEND]``), so ``nsys`` and torch.profiler show
    the same breakdown as the parity report."""
    open_ranges: list[Range] = []
    handles = []
    for name, module in layer_modules(model).items():
        def pre(module, args, name=name):
            open_ranges.append(Range(f"{prefix}{name}").__enter__())

        def post(module, args, output):
            open_ranges.pop().__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def in_range(event: dispatch.Dispatched, impl: Callable) -> Callable:
        def ranged(*args, **kwargs):
            with Range(op_range_name(event, prefix)):
                return impl(*args, **kwargs)

        return ranged

    try:
        with dispatch.listen(in_range):
            yield
    finally:
        for handle in handles:
            handle.remove()
