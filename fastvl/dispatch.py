"""Backend dispatch for fastvl's ops.

Every op owns an ordered list of named backends (fastest first, the plain-torch ones last). A backend
declares when it is *available* at all on this machine (package installed, extension built) and which
*inputs* it supports (device, dtype, head dim, ...), each as a list of human-readable reasons why not.
``auto`` takes the first backend with no reasons whose ``auto_devices`` include the inputs' device;
asking for a backend that cannot run raises :class:`BackendUnavailableError` listing every backend and
why it was or was not usable.

Choosing a backend, strongest first:

* per call: ``fastvl.ops.attention(..., backend="sdpa")``;
* per scope: ``with fastvl.use_backend("reference"):`` (all ops) or
  ``with fastvl.use_backend(attention="sdpa", region_kl_loss="cpp"):`` (per op);
* per process: ``FASTVL_BACKEND=reference`` or ``FASTVL_BACKEND="attention=sdpa,region_kl_loss=cpp"``.

A global choice (scope or environment, without an op name) that an op does not define falls back to
``auto`` for that op, so ``FASTVL_BACKEND=cpp`` does not break attention; a per-op or per-call choice
never falls back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

ENV_VAR = "FASTVL_BACKEND"
AUTO = "auto"


class BackendUnavailableError(RuntimeError):
    """Raised when the requested backend cannot run the given inputs (or none can)."""


@dataclasses.dataclass(frozen=True)
class Backend:
    """One implementation of an op.

    ``impl`` takes what the op's public function hands its backends (the attention ops: one frozen
    inputs object; the others: their validated arguments). ``available()`` gives the reasons it
    cannot run on this machine at all; ``supports(**features)`` the reasons it cannot run these inputs.
    ``auto_devices``: device types on which ``auto`` may pick it (explicit requests ignore this).
    """

    name: str
    impl: Callable
    available: Callable[[], list[str]]
    supports: Callable[..., list[str]]
    auto_devices: tuple[str, ...]

    def unavailable(self) -> list[str]:
        """Why this backend cannot run on this machine at all (cached; a constant under torch.compile)."""
        return list(_availability(self))

    def reasons(self, features: dict) -> list[str]:
        return self.unavailable() or self.supports(**features)


class Op:
    """A dispatched op: ``op.register(...)`` adds backends, ``op.select(...)`` picks one."""

    def __init__(self, name: str, probe: dict | None = None, table_key: Sequence[str] = (),
                 rule: Callable[..., list[tuple[str, str]]] | None = None):
        self.name = name
        self.backends: dict[str, Backend] = {}
        # Features of typical inputs, used by `fastvl info` to ask which backends run on this machine.
        self.probe = dict(probe or {})
        # The features a calibration table entry is keyed on, and the rule auto falls back to:
        # rule(device, **features) -> [(backend, why)] in preference order (empty: registration order).
        self.table_key = tuple(table_key)
        self.rule = rule

    def register(self, name: str, *, available: Callable[[], list[str]] | None = None,
                 supports: Callable[..., list[str]] | None = None,
                 auto_devices: Sequence[str] = ("cpu", "cuda")) -> Callable:
        """Decorator adding a backend; registration order is auto's preference order."""

        def decorator(impl: Callable) -> Callable:
            if name in self.backends:
                raise ValueError(f"backend {name!r} of op {self.name!r} is registered twice")
            self.backends[name] = Backend(name, impl, available or _no_reasons, supports or _no_reasons,
                                          tuple(auto_devices))
            return impl

        return decorator

    def requested(self, backend: str | None) -> tuple[str, bool]:
        """(backend name, strict): per-call beats scope beats environment; strict unless global."""
        if backend is not None and backend != AUTO:
            return backend, True
        for scope in reversed(_SCOPES):
            if self.name in scope:
                return scope[self.name], True
            if None in scope:
                return scope[None], False
        env = _env_choice()
        if self.name in env:
            return env[self.name], True
        if None in env:
            return env[None], False
        return AUTO, False

    def select(self, backend: str | None, device: torch.device, **features) -> Backend:
        """The backend to run inputs with these features on ``device``."""
        features["device"] = device
        chosen = self._choose(backend, device, features)
        if _LISTENERS and not torch.compiler.is_compiling():
            return _tell_listeners(self, chosen, device, features)
        return chosen

    def _choose(self, backend: str | None, device: torch.device, features: dict) -> Backend:
        name, strict = self.requested(backend)
        if name != AUTO:
            chosen = self.backends.get(name)
            if chosen is None:
                if strict:
                    raise BackendUnavailableError(
                        f"{self.name}: unknown backend {name!r}; known: {', '.join(self.backends)}")
            elif not chosen.reasons(features):
                return chosen
            elif strict:
                raise BackendUnavailableError(self._report(f"backend {name!r} cannot run these inputs", features))
        return self.auto(device, features)[0]

    def auto(self, device: torch.device, features: dict) -> tuple[Backend, str]:
        """``auto``'s choice for these features on ``device`` and why: the calibration table's entry for
        this device and shape (see :func:`table_entry`), else the op's rule, else the first usable
        backend in registration order; each only if it can run these inputs."""
        features = {**features, "device": device}
        for name, why in self._candidates(device, features):
            candidate = self.backends.get(name)
            if candidate is not None and device.type in candidate.auto_devices and not candidate.reasons(features):
                return candidate, why
        raise BackendUnavailableError(self._report("no backend can run these inputs", features))

    def _candidates(self, device: torch.device, features: dict) -> Iterator[tuple[str, str]]:
        entry = table_entry(self, device, features)
        if entry is not None:
            yield entry["backend"], f"calibration table: measured fastest at this shape ({entry['source']})"
        if self.rule is not None:
            yield from self.rule(**features)
        for name in self.backends:
            yield name, "first usable backend in auto order"

    def table(self, device: torch.device | None = None, **features) -> dict[str, list[str]]:
        """{backend: reasons it cannot run (empty = usable)} for a device and features."""
        if device is None:
            return {name: b.unavailable() for name, b in self.backends.items()}
        features["device"] = device
        return {name: b.reasons(features) for name, b in self.backends.items()}

    def _report(self, headline: str, features: dict) -> str:
        lines = [f"{self.name}: {headline}. Backends:"]
        for name, b in self.backends.items():
            reasons = b.reasons(features)
            lines.append(f"  {name}: " + ("usable" if not reasons else "; ".join(reasons)))
        return "\n".join(lines)


def _no_reasons(**_features) -> list[str]:
    return []


# Listeners ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Dispatched:
    """One dispatch decision, as a listener sees it: the op, the backend chosen, the device and the
    features it was chosen on (dtype, head dim, lengths, mask, dropout, ...)."""

    op: str
    backend: str
    device: torch.device
    features: dict


Listener = Callable[[Dispatched, Callable], Callable | None]
_LISTENERS: list[Listener] = []


@contextlib.contextmanager
def listen(callback: Listener) -> Iterator[None]:
    """Inside the block, every op call tells ``callback(event, impl)`` which backend it dispatched to
    (a :class:`Dispatched`) and the implementation about to run. A callback returning a callable
    replaces ``impl`` for that call (to wrap it: record inputs and outputs, open a profiler range);
    returning None only observes. Listeners nest (the innermost wraps last, so it runs outermost) and
    are not consulted while torch.compile traces."""
    _LISTENERS.append(callback)
    try:
        yield
    finally:
        _LISTENERS.remove(callback)


def _tell_listeners(op: Op, chosen: Backend, device: torch.device, features: dict) -> Backend:
    event = Dispatched(op.name, chosen.name, device, {k: v for k, v in features.items() if k != "device"})
    impl = chosen.impl
    for callback in list(_LISTENERS):
        impl = callback(event, impl) or impl
    return chosen if impl is chosen.impl else dataclasses.replace(chosen, impl=impl)


_AVAILABILITY: dict[int, tuple[str, ...]] = {}


@torch.compiler.assume_constant_result
def _availability(backend: Backend) -> tuple[str, ...]:
    # Evaluated once per backend, eagerly even while torch.compile traces (the machine does not change).
    key = id(backend)
    if key not in _AVAILABILITY:
        _AVAILABILITY[key] = tuple(backend.available())
    return _AVAILABILITY[key]


_SCOPES: list[dict[str | None, str]] = []
_OPS: dict[str, Op] = {}


def op(name: str, probe: dict | None = None, table_key: Sequence[str] = (),
       rule: Callable[..., list[tuple[str, str]]] | None = None) -> Op:
    """The registry entry for op ``name`` (created on first use). ``probe``: the features (besides
    device and dtype) of a typical input, which ``fastvl info`` passes to every backend;
    ``table_key``: the features a calibration table is keyed on; ``rule``: auto's fallback order."""
    if name not in _OPS:
        _OPS[name] = Op(name, probe, table_key, rule)
    return _OPS[name]


def length_bucket(length: int | None) -> int | None:
    """A sequence length rounded up to a power of two (None stays None): the form lengths take in
    dispatch features, so choices (and torch.compile's guards on them) stay few."""
    if length is None:
        return None
    return 1 << max(0, int(length) - 1).bit_length()


def backward_expected(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd will differentiate this call (a dispatch feature: a backend fast forward-only
    may be slow forward+backward)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# Calibration tables ---------------------------------------------------------------------------------
# ``fastvl bench calibrate`` measures every backend per shape on one device and writes a table:
# {"schema": 1, "device": KIND, "source": ..., "entries": {op: {key: backend}}}, where KIND is "cpu" or
# the CUDA device's name and key is "feature=value,..." over the op's table_key. auto reads the table
# named by FASTVL_DISPATCH_TABLE, else the packaged fastvl/configs/dispatch-<kind>.json.

TABLE_ENV = "FASTVL_DISPATCH_TABLE"
TABLES_DIR = Path(__file__).parent / "configs"
_TABLES: dict[str, dict] = {}
_KINDS: dict[int, str] = {}


def device_kind(device: torch.device) -> str:
    """"cpu", or the CUDA device's name (a table measured on one GPU model holds for that model)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return device.type
    return _cuda_name(device.index if device.index is not None else torch.cuda.current_device())


@torch.compiler.assume_constant_result
def _cuda_name(index: int) -> str:
    if index not in _KINDS:
        _KINDS[index] = torch.cuda.get_device_name(index)
    return _KINDS[index]


def default_table_path(kind: str) -> Path:
    return TABLES_DIR / f"dispatch-{re.sub(r'[^a-z0-9]+', '-', kind.lower()).strip('-')}.json"


def table_path(kind: str) -> Path:
    """Where auto reads the table of a device kind: ``FASTVL_DISPATCH_TABLE``, else the packaged one."""
    override = os.environ.get(TABLE_ENV)
    return Path(override) if override else default_table_path(kind)


def load_table(kind: str) -> dict:
    """The calibration table for a device kind ({} when there is none); read once per process."""
    path = table_path(kind)
    cache_key = f"{kind}@{path}"
    if cache_key not in _TABLES:
        table = {}
        if path.is_file():
            table = json.loads(path.read_text())
            if table.get("device") != kind:
                table = {}  # measured on another device: not this one's choice
        _TABLES[cache_key] = table
    return _TABLES[cache_key]


def table_key(op: Op, features: dict) -> str:
    parts = []
    for name in op.table_key:
        value = features.get(name)
        parts.append(f"{name}={str(value).removeprefix('torch.') if isinstance(value, torch.dtype) else value}")
    return ",".join(parts)


def table_entry(op: Op, device: torch.device, features: dict) -> dict | None:
    """{"backend", "key", "source"} of the calibration table for these features, or None. Under
    torch.compile the lookup runs eagerly and its result is a constant of the graph."""
    if not op.table_key:
        return None
    key = table_key(op, features)
    backend, source = _lookup(op.name, device_kind(device), key)
    return {"backend": backend, "key": key, "source": source} if backend else None


@torch.compiler.assume_constant_result
def _lookup(op_name: str, kind: str, key: str) -> tuple[str, str]:
    table = load_table(kind)
    return table.get("entries", {}).get(op_name, {}).get(key, ""), table.get("source", "calibration table")


def registered_ops() -> dict[str, Op]:
    return dict(_OPS)


@contextlib.contextmanager
def use_backend(default: str | None = None, /, **per_op: str) -> Iterator[None]:
    """Scope a backend choice: ``use_backend("reference")`` or ``use_backend(attention="sdpa")``."""
    scope: dict[str | None, str] = dict(per_op)
    if default is not None:
        scope[None] = default
    _SCOPES.append(scope)
    try:
        yield
    finally:
        _SCOPES.remove(scope)


def _env_choice() -> dict[str | None, str]:
    value = os.environ.get(ENV_VAR, "").strip()
    if not value:
        return {}
    choice: dict[str | None, str] = {}
    for item in value.split(","):
        op_name, sep, backend = item.strip().partition("=")
        if sep:
            choice[op_name.strip()] = backend.strip()
        else:
            choice[None] = op_name
    return choice


# Availability checks shared by backends ------------------------------------------------------------


def needs_module(module: str) -> Callable[[], list[str]]:
    def check() -> list[str]:
        return [] if importlib.util.find_spec(module) is not None else [f"python package {module!r} is not installed"]

    return check


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> list[str]:
    if importlib.util.find_spec("triton") is None:
        return ["python package 'triton' is not installed"]
    if not torch.cuda.is_available() and not triton_interpreting():
        return ["no CUDA device (set TRITON_INTERPRET=1 before importing fastvl to run Triton on the CPU)"]
    return []


def triton_device(device: torch.device, **_features) -> list[str]:
    """Triton runs on CUDA tensors, and on CPU tensors only under the interpreter."""
    if device.type == "cuda" or (device.type == "cpu" and triton_interpreting()):
        return []
    return [f"tensors on {device.type} (triton needs CUDA, or CPU under TRITON_INTERPRET=1)"]


def needs_cuda_device(device: torch.device, **_features) -> list[str]:
    return [] if device.type == "cuda" else [f"tensors on {device.type}, needs CUDA"]


def needs_cpu_device(device: torch.device, **_features) -> list[str]:
    return [] if device.type == "cpu" else [f"tensors on {device.type}, needs CPU"]
