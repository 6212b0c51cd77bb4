"""Plain-PyTorch references of every fastvl op, written op for op like the original projects' code.

They accept any floating dtype (float64 included), are what every fused kernel is proven against,
and serve as the ``reference`` backend. Where an original produces NaN or an arbitrary value
(nothing masked, a query with every key padded), the reference returns the defined fastvl result
(0, or zeros) and says so in its docstring.
"""

from fastvl.reference.attention import attention_ref, varlen_attention_ref
from fastvl.reference.bias_gelu import bias_gelu_ref
from fastvl.reference.co_attention import co_attention_ref
from fastvl.reference.cross_entropy import linear_cross_entropy_ref, soft_cross_entropy_ref
from fastvl.reference.itc import itc_loss_ref, itc_queue_update_ref, itm_hard_negatives_ref
from fastvl.reference.layer_norm import layer_norm_ref
from fastvl.reference.region_kl import linear_region_kl_loss_ref, region_kl_loss_ref

__all__ = [
    "attention_ref", "varlen_attention_ref", "bias_gelu_ref", "layer_norm_ref", "co_attention_ref",
    "linear_cross_entropy_ref",
    "soft_cross_entropy_ref", "itc_loss_ref", "itc_queue_update_ref", "itm_hard_negatives_ref",
    "linear_region_kl_loss_ref", "region_kl_loss_ref",
]
