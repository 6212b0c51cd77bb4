"""fastvl's fused ops. Each takes ``backend=`` (default: auto, or the scope / ``FASTVL_BACKEND`` choice).

Layout: ``<op>_op.py`` holds one op (or a family of closely related ops) with its validation, custom
ops, autograd glue and backends; ``*_common.py`` and ``attention_launch.py`` hold what siblings share
(public names only). Module names never equal the functions exported here, so ``fastvl.ops.attention``
is always the function and ``fastvl.ops.attention_op`` its module.
"""

from fastvl.ops.attention_launch import dropout_keep_mask
from fastvl.ops.attention_op import attention
from fastvl.ops.bias_gelu_op import bias_gelu
from fastvl.ops.co_attention_op import co_attention
from fastvl.ops.itc_op import itc_loss, itc_queue_update_, itm_hard_negatives
from fastvl.ops.layer_norm_op import layer_norm
from fastvl.ops.linear_cross_entropy_op import linear_cross_entropy
from fastvl.ops.region_kl_op import linear_region_kl_loss, region_kl_loss

__all__ = [
    "attention", "bias_gelu", "co_attention", "dropout_keep_mask", "layer_norm", "itc_loss", "itc_queue_update_",
    "itm_hard_negatives", "linear_cross_entropy", "linear_region_kl_loss", "region_kl_loss",
]
