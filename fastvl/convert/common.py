"""What every checkpoint converter shares: safe loading, the rule engine, key bookkeeping and the strict report.

A converter's layout is a list of :data:`Rule` s, ``(regex over a fastvl name, match -> original
name(s))``; several original names are concatenated along dim 0 (BERT's query / key / value -> one
``qkv``). :func:`convert_with_rules` / :func:`export_with_rules` apply a list both ways.

A converter reads the original state dict through a :class:`SourceState` (``take`` marks a key used;
a key that is absent is recorded as missing), builds the fastvl state dict, and calls
:func:`load_converted`, which loads it into the model and reports, by name, every original key that
was missing or left unused, every model parameter not produced and every shape that disagrees.
Strict by default: any of those raises :class:`ConversionError`. Weights the original defines but
never uses in its forward (``known_unused`` patterns) are listed in the report and skipped.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import pickle
import re
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

# Older BERT checkpoints name LayerNorm parameters gamma / beta.
_GAMMA_BETA = re.compile(r"(?<=LayerNorm)\.(gamma|beta)$|(?<=LayerNorm\d)\.(gamma|beta)$")
_CONTAINER_KEYS = ("state_dict", "model", "module", "model_state_dict")


Rule = tuple[str, Callable[[re.Match], Sequence[str]]]


class ConversionError(ValueError):
    """A checkpoint does not match the model: the message names every offending key."""


def load_state_dict_file(path: str | os.PathLike, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Loads a checkpoint file as a flat ``{name: tensor}`` dict on the CPU.

    ``.safetensors`` files load with safetensors; anything else with ``torch.load(weights_only=True)``,
    which refuses arbitrary pickled objects. ``allow_pickle=True`` (only for files you trust) falls back
    to full unpickling. A top-level container (``{"state_dict": ...}``, ``{"model": ...}``) is unwrapped.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError) as error:
            with open(path, "rb") as handle:
                head = handle.read(2)
            what = (" (it starts like a Python pickle or a torch zip file: a .bin/.pt renamed .safetensors?)"
                    if head[:1] == b"\x80" or head == b"PK" else "")
            raise ConversionError(f"{path!r} is not a readable safetensors file ({error}){what}") from None
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        wanted = re.search(r"GLOBAL ([\w.]+)", str(error))
        if wanted is None:
            raise ConversionError(f"{path!r} is not a readable checkpoint: truncated or damaged "
                                  f"({_first_line(error)})") from None
        if not allow_pickle:
            raise ConversionError(
                f"{path!r} cannot be loaded with weights_only=True: it contains pickled objects ({wanted.group(1)}). "
                "If you trust the file, pass allow_pickle=True (CLI: --allow-pickle)") from error
        loaded = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, ValueError, OSError) as error:
        raise ConversionError(f"{path!r} is not a readable checkpoint: truncated or damaged "
                              f"({_first_line(error) or type(error).__name__})") from None
    return unwrap_state_dict(loaded)


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return next((line for line in lines if "Unsupported" in line or "failed" in line), lines[0] if lines else "")


def unwrap_state_dict(loaded) -> dict[str, torch.Tensor]:
    """The tensor dict inside a checkpoint object (nested ``state_dict`` / ``model`` containers)."""
    while isinstance(loaded, Mapping) and not any(isinstance(v, torch.Tensor) for v in loaded.values()):
        inner = next((loaded[k] for k in _CONTAINER_KEYS if k in loaded), None)
        if inner is None:
            raise ConversionError(f"no tensors found in the checkpoint (top-level keys: {sorted(loaded)[:20]})")
        loaded = inner
    if not isinstance(loaded, Mapping):
        raise ConversionError(f"expected a state dict, got {type(loaded).__name__}")
    return {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}


def normalise_keys(state_dict: Mapping[str, torch.Tensor], strip_prefixes: Iterable[str] = ("module.",)
                   ) -> dict[str, torch.Tensor]:
    """Renames ``LayerNorm.gamma`` / ``beta`` to ``weight`` / ``bias`` and strips wrapper prefixes
    (DataParallel's ``module.``) present on every key."""
    state = dict(state_dict)
    for prefix in strip_prefixes:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    renamed = {}
    for key, value in state.items():
        renamed[_GAMMA_BETA.sub(lambda m: ".weight" if "gamma" in m.group(0) else ".bias", key)] = value
    return renamed


class SourceState:
    """The original state dict being converted; records which keys were used and which were missing."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor], known_unused: Iterable[str] = ()):
        self.state = normalise_keys(state_dict)
        self.known_unused = tuple(known_unused)
        self.used: set[str] = set()
        self.missing: list[str] = []

    def __contains__(self, key: str) -> bool:
        return key in self.state

    def keys_with_prefix(self, prefix: str) -> list[str]:
        return [k for k in self.state if k.startswith(prefix)]

    def take(self, key: str) -> torch.Tensor | None:
        """The tensor named ``key`` (marked used), or None (recorded missing)."""
        if key not in self.state:
            self.missing.append(key)
            return None
        self.used.add(key)
        return self.state[key]

    def take_cat(self, keys: Iterable[str], dim: int = 0) -> torch.Tensor | None:
        """The named tensors concatenated along ``dim`` (e.g. query / key / value -> a fused QKV)."""
        parts = [self.take(k) for k in keys]
        return None if any(p is None for p in parts) else torch.cat(parts, dim=dim)

    def is_known_unused(self, key: str) -> bool:
        return any(fnmatch.fnmatchcase(key, pattern) for pattern in self.known_unused)

    def unused(self) -> list[str]:
        return sorted(k for k in self.state if k not in self.used and not self.is_known_unused(k))

    def skipped(self) -> list[str]:
        return sorted(k for k in self.state if k not in self.used and self.is_known_unused(k))


@dataclasses.dataclass
class ConversionReport:
    """What a conversion did. ``ok`` when nothing was missing, unused, unproduced or mis-shaped."""

    loaded: list[str]
    missing_in_checkpoint: list[str]
    unused_in_checkpoint: list[str]
    skipped_known_unused: list[str]
    not_produced: list[str]
    shape_mismatches: list[str]
    bad_values: list[str] = dataclasses.field(default_factory=list)  # NaN/Inf, integers for a float tensor

    @property
    def ok(self) -> bool:
        return not (self.missing_in_checkpoint or self.unused_in_checkpoint or self.not_produced
                    or self.shape_mismatches or self.bad_values)

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors"]
        for title, names in (("missing in the checkpoint", self.missing_in_checkpoint),
                             ("unused checkpoint keys", self.unused_in_checkpoint),
                             ("model tensors not produced", self.not_produced),
                             ("shape mismatches", self.shape_mismatches),
                             ("bad values", self.bad_values),
                             ("known-unused weights skipped", self.skipped_known_unused)):
            if names:
                lines.append(f"{title} ({len(names)}): " + ", ".join(names))
        return "\n".join(lines)


def load_converted(model: torch.nn.Module, converted: Mapping[str, torch.Tensor | None], source: SourceState, *,
                   strict: bool = True, expected: Iterable[str] | None = None) -> ConversionReport:
    """Loads ``converted`` (fastvl names; None where a source key was missing) into ``model``.

    ``expected``: the model tensors the checkpoint must provide (default: all of them; a partial
    initialisation such as a text stream from BERT names its part). With ``strict`` (the default),
    raises :class:`ConversionError` naming every problem; otherwise loads what matches and returns
    the report (check ``report.ok``).
    """
    state = model.state_dict()
    expected = {k: state[k] for k in expected} if expected is not None else state
    produced = {k: v for k, v in converted.items() if v is not None}
    mismatches = [f"{k}: checkpoint {list(v.shape)} vs model {list(expected[k].shape)}"
                  for k, v in produced.items() if k in expected and v.shape != expected[k].shape]
    extra = sorted(k for k in produced if k not in expected)
    report = ConversionReport(
        loaded=sorted(k for k in produced if k in expected and produced[k].shape == expected[k].shape),
        missing_in_checkpoint=sorted(set(source.missing)), unused_in_checkpoint=source.unused(),
        skipped_known_unused=source.skipped(), not_produced=sorted(k for k in expected if k not in produced),
        shape_mismatches=mismatches + [f"{k}: produced but not a model tensor" for k in extra],
        bad_values=_bad_values(produced, expected))
    if strict and not report.ok:
        raise ConversionError(f"checkpoint does not match {type(model).__name__}:\n{report}")
    loadable = {k: produced[k] for k in report.loaded if not any(b.startswith(f"{k}:") for b in report.bad_values)}
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if name in loadable:
                tensor.copy_(loadable[name].to(tensor.dtype))
    return report


def _bad_values(produced: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> list[str]:
    """Tensors no model should load: NaN/Inf values, or integers where the model holds floats."""
    bad = []
    for name, tensor in produced.items():
        if name not in expected or not expected[name].is_floating_point():
            continue
        if not tensor.is_floating_point():
            bad.append(f"{name}: {tensor.dtype} values for a floating-point tensor")
        elif not torch.isfinite(tensor).all():
            bad.append(f"{name}: {int((~torch.isfinite(tensor)).sum())} NaN/Inf values")
    return bad


# the rule engine ---------------------------------------------------------------------------------------


def original_names(name: str, rules: Sequence[Rule]) -> list[str]:
    """The original key(s) holding the fastvl tensor ``name`` (several = concatenated along dim 0)."""
    for pattern, names in rules:
        match = re.match(pattern, name)
        if match:
            return list(names(match))
    raise ConversionError(f"no original name known for the fastvl tensor {name!r}")


def convert_with_rules(model: torch.nn.Module, source: SourceState,
                       rules: Sequence[Rule]) -> dict[str, torch.Tensor | None]:
    """Every tensor of ``model`` taken from the original keys the rules name (None where missing);
    pass the result to :func:`fastvl.convert.common.load_converted`."""
    converted = {}
    for name in model.state_dict():
        keys = original_names(name, rules)
        converted[name] = source.take(keys[0]) if len(keys) == 1 else source.take_cat(keys)
    return converted


def export_with_rules(model: torch.nn.Module, rules: Sequence[Rule], prefix: str = "") -> dict[str, torch.Tensor]:
    """The inverse: model tensors under their original names (fused tensors split back)."""
    exported = {}
    for name, tensor in model.state_dict().items():
        keys = original_names(name, rules)
        for key, part in zip(keys, tensor.chunk(len(keys), dim=0) if len(keys) > 1 else (tensor,)):
            exported[prefix + key] = part.detach().clone()
    return exported


def check_tied(source: SourceState, key: str, expected: torch.Tensor | None, what: str) -> None:
    """Marks ``key`` (a tied copy in the original) used after checking it equals ``expected``."""
    if key not in source or expected is None:
        return
    value = source.take(key)
    if value.shape != expected.shape or not torch.equal(value.to(expected.dtype), expected):
        raise ConversionError(f"{key} must equal {what} (they are tied in the original), but differs")
