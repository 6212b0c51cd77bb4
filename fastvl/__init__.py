"""fastvl: fused, numerically proven kernels and models for vision-and-language transformers."""

from fastvl import ops
from fastvl.dispatch import BackendUnavailableError, use_backend

__version__ = "0.1.0"
__all__ = ["ops", "use_backend", "BackendUnavailableError", "__version__"]
