"""Checkpoint converters from the original projects' layouts to fastvl models and back.

All loading is safe by default (``weights_only=True`` / safetensors) and strict: every unmatched or
unused key is reported by name (see :mod:`fastvl.convert.common`).
"""

from fastvl.convert.common import (ConversionError, ConversionReport, SourceState, load_converted,
                                   load_state_dict_file, normalise_keys)

__all__ = ["ConversionError", "ConversionReport", "SourceState", "load_converted", "load_state_dict_file",
           "normalise_keys"]
