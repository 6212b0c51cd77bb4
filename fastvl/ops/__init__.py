"""fastvl's fused ops. Each takes ``backend=`` (default: auto, or the scope / ``FASTVL_BACKEND`` choice)."""

from fastvl.ops.attention import attention
from fastvl.ops.bias_gelu import bias_gelu
from fastvl.ops.co_attention import co_attention
from fastvl.ops.itc import itc_loss, itc_queue_update_, itm_hard_negatives
from fastvl.ops.layer_norm import layer_norm
from fastvl.ops.linear_cross_entropy import linear_cross_entropy
from fastvl.ops.region_kl import linear_region_kl_loss, region_kl_loss

__all__ = [
    "attention", "bias_gelu", "co_attention", "layer_norm", "itc_loss", "itc_queue_update_", "itm_hard_negatives",
    "linear_cross_entropy",
    "linear_region_kl_loss", "region_kl_loss",
]
