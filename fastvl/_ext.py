"""Loads the optional C++/CUDA extension ``fastvl._C`` and says what it contains.

A missing or broken extension is not an error: ops that need it report "not built" through
dispatch, and one warning names the fix.
"""

from __future__ import annotations

import functools
import warnings

FIX = "reinstall with a C++ compiler present: pip install --no-build-isolation ."


@functools.lru_cache(maxsize=None)
def load():
    """Returns the extension module, or None (with one warning) when it cannot be imported."""
    try:
        from fastvl import _C
    except ImportError as error:
        warnings.warn(f"fastvl._C is not available ({error}); cpp/cuda backends disabled. Fix: {FIX}",
                      stacklevel=2)
        return None
    return _C


@functools.lru_cache(maxsize=None)
def build_info() -> dict:
    """{'built': bool, 'cuda': bool, 'openmp': bool, 'ops': [names]} of the installed extension."""
    ext = load()
    if ext is None:
        return {"built": False, "cuda": False, "openmp": False, "ops": []}
    info = dict(ext.build_info())
    info["built"] = True
    info["ops"] = list(info["ops"])
    return info


def needs(symbol: str):
    """A backend's availability check (``dispatch`` style: a list of reasons) for ``fastvl._C.<symbol>``."""

    def available() -> list[str]:
        reason = missing_reason(symbol)
        return [reason] if reason else []

    return available


def missing_reason(symbol: str) -> str | None:
    """Why ``fastvl._C.<symbol>`` cannot be used here, or None if it can."""
    ext = load()
    if ext is None:
        return f"fastvl._C is not built ({FIX})"
    if not hasattr(ext, symbol):
        if symbol.endswith("_cuda"):
            return (f"fastvl._C was built without CUDA sources ({symbol}): they build only against a CUDA torch "
                    "with nvcc")
        return f"fastvl._C was built without {symbol} (rebuild: {FIX})"
    return None
