"""The project's numerical parity rule, shared by tests, benchmarks and ``fastvl parity``.

For an output or gradient in dtype ``d``, the fused result's max error against a float64 run of the
reference must be at most ``FACTOR`` (2) times the max error of the eager reference run in ``d``,
plus a small floor relative to the result's magnitude (the floor covers the case where the eager
error happens to be 0).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence

import torch

from fastvl import _checks

FACTOR = 2.0
# Floor, relative to max(1, max|exact|): a few units in the last place of each dtype.
RELATIVE_FLOOR = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@dataclasses.dataclass
class ParityResult:
    name: str
    dtype: torch.dtype
    fused_error: float
    eager_error: float
    allowed: float
    scale: float
    has_nan: bool

    @property
    def ok(self) -> bool:
        return not self.has_nan and self.fused_error <= self.allowed

    def __str__(self) -> str:
        verdict = "ok" if self.ok else "BROKEN"
        return (f"{self.name}: fused err {self.fused_error:.3e}, eager err {self.eager_error:.3e}, "
                f"allowed {self.allowed:.3e} (|exact| {self.scale:.3e}, {self.dtype}) {verdict}"
                + (" [NaN/Inf in fused]" if self.has_nan else ""))


def compare(name: str, fused: torch.Tensor, eager: torch.Tensor, exact: torch.Tensor,
            factor: float = FACTOR, floor: float | None = None) -> ParityResult:
    """Measures ``fused`` and ``eager`` (same dtype) against ``exact`` (float64) under the rule."""
    exact = exact.detach().double()
    fused_d, eager_d = fused.detach().double(), eager.detach().double()
    if fused_d.shape != exact.shape or eager_d.shape != exact.shape:
        raise AssertionError(f"{name}: shapes differ: fused {list(fused.shape)}, eager {list(eager.shape)}, "
                             f"exact {list(exact.shape)}")
    finite = torch.isfinite(exact)
    has_nan = bool((~torch.isfinite(fused_d) & finite).any())
    scale = float(exact[finite].abs().max()) if finite.any() else 0.0
    fused_error = float((fused_d - exact)[finite].abs().max()) if finite.any() else 0.0
    eager_error = float((eager_d - exact)[finite].abs().max()) if finite.any() else 0.0
    if floor is None:
        floor = RELATIVE_FLOOR.get(fused.dtype, 1e-6) * max(1.0, scale)
    return ParityResult(name, fused.dtype, fused_error, eager_error, factor * eager_error + floor, scale, has_nan)


def assert_parity(name: str, fused: torch.Tensor, eager: torch.Tensor, exact: torch.Tensor, **kwargs) -> ParityResult:
    result = compare(name, fused, eager, exact, **kwargs)
    assert result.ok, str(result)
    return result


def _tensors(output) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    return [t for t in output if isinstance(t, torch.Tensor)]


def check_op(fused: Callable, reference: Callable, inputs: Sequence, *, grad: Sequence[bool] | bool = True,
             name: str = "op", seed: int = 0, factor: float = FACTOR,
             floor: float | None = None) -> list[ParityResult]:
    """Runs ``fused(*inputs)``, ``reference(*inputs)`` and ``reference`` on float64 copies; compares
    every output and, with the same random upstream gradient, the gradient of every floating input
    selected by ``grad``. Non-tensor inputs pass through unchanged. Returns the results (all ok).
    """
    wants = [grad] * len(inputs) if isinstance(grad, bool) else list(grad)

    def prepare(dtype: torch.dtype | None) -> list:
        prepared = []
        for value, want in zip(inputs, wants):
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                value = value.detach().to(dtype or value.dtype).requires_grad_(want)
            prepared.append(value)
        return prepared

    fused_in, eager_in, exact_in = prepare(None), prepare(None), prepare(torch.float64)
    fused_out, eager_out, exact_out = (_tensors(f(*x)) for f, x in
                                       ((fused, fused_in), (reference, eager_in), (reference, exact_in)))
    results = [assert_parity(f"{name} output[{i}]", f, e, x, factor=factor, floor=floor)
               for i, (f, e, x) in enumerate(zip(fused_out, eager_out, exact_out))]
    generator = torch.Generator().manual_seed(seed)
    upstream = [torch.randn(t.shape, generator=generator, dtype=torch.float64).to(t.device) for t in exact_out]
    differentiable = [i for i, t in enumerate(exact_out) if t.requires_grad]
    if not differentiable or not any(wants):
        return results

    def backward(outputs, prepared):
        torch.autograd.backward([outputs[i] for i in differentiable],
                                [upstream[i].to(outputs[i].dtype) for i in differentiable])
        return [t.grad for t in prepared if isinstance(t, torch.Tensor) and t.requires_grad]

    grads = zip(backward(fused_out, fused_in), backward(eager_out, eager_in), backward(exact_out, exact_in))
    for index, (f, e, x) in enumerate(grads):
        if f is None or x is None:
            assert f is None and (x is None or not x.any()), f"{name}: grad[{index}] missing on one side"
            continue
        results.append(assert_parity(f"{name} grad[{index}]", f, e, x, factor=factor, floor=floor))
    return results


class HostSyncError(RuntimeError):
    """A tensor's values were read back to the host inside :func:`forbid_host_syncs`."""


_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu")


@contextlib.contextmanager
def forbid_host_syncs() -> Iterator[None]:
    """Inside the block, reading a tensor's values back to the host raises :class:`HostSyncError`:
    ``item``, ``tolist``, ``bool``/``int``/``float`` of a tensor, ``numpy`` and ``cpu`` (on CUDA also
    every synchronising call, through ``torch.cuda.set_sync_debug_mode("error")``). fastvl treats CPU
    tensors as device tensors meanwhile (no host value checks), so a CPU test walks the GPU's path.
    Data-dependent shapes (``nonzero``) are caught on CUDA only."""

    def forbidden(name):
        def read(self, *args, **kwargs):
            raise HostSyncError(f"Tensor.{name}() read a {tuple(self.shape)} tensor back to the host")

        return read

    saved = {name: getattr(torch.Tensor, name) for name in _READS}
    cuda_mode = torch.cuda.get_sync_debug_mode() if torch.cuda.is_available() else None
    for name in _READS:
        setattr(torch.Tensor, name, forbidden(name))
    _checks.SIMULATE_DEVICE = True
    if cuda_mode is not None:
        torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)
        _checks.SIMULATE_DEVICE = False
        if cuda_mode is not None:
            torch.cuda.set_sync_debug_mode(cuda_mode)


def random_padding_mask(batch: int, length: int, *, generator: torch.Generator | None = None,
                        fully_masked_rows: Sequence[int] = (), device="cpu") -> torch.Tensor:
    """bool ``[batch, length]`` with True = real: each row keeps a random prefix of length >= 1
    (rows listed in ``fully_masked_rows`` keep none)."""
    lengths = torch.randint(1, length + 1, (batch,), generator=generator)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    for row in fully_masked_rows:
        mask[row] = False
    return mask.to(device)
