"""Checkpoint converters from the original projects' layouts to fastvl models and back.

All loading is safe by default (``weights_only=True`` / safetensors) and strict: every unmatched or
unused key is reported by name (see :mod:`fastvl.convert.common`).
"""

from fastvl.convert.albef import albef_from_original, albef_to_original
from fastvl.convert.common import (
                                   ConversionError,
                                   ConversionReport,
                                   SourceState,
                                   load_converted,
                                   load_state_dict_file,
                                   normalise_keys,
)
from fastvl.convert.hf_bert import text_stream_from_hf_bert
from fastvl.convert.vilbert import vilbert_from_original, vilbert_to_original
from fastvl.convert.vlbert import vlbert_from_original, vlbert_to_original

__all__ = ["albef_from_original", "albef_to_original", "vlbert_from_original", "vlbert_to_original",
           "ConversionError", "ConversionReport", "SourceState", "load_converted", "load_state_dict_file",
           "normalise_keys", "text_stream_from_hf_bert", "vilbert_from_original", "vilbert_to_original"]
