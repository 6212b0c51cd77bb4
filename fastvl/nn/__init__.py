"""fastvl's layers, built only from :mod:`fastvl.ops` and torch; each usable on its own.

Every attention layer takes padding masks (bool ``[B, L]``, True = real; the original additive form
too), supports activation checkpointing (:func:`set_gradient_checkpointing`) and returns attention
probabilities on request (``output_attentions=True``: the attention ops' ``return_probs=True``).
"""

from fastvl.nn.attention import CrossAttention, SelfAttention
from fastvl.nn.common import (
                              Checkpointable,
                              FeedForward,
                              InputSharingLinear,
                              LayerNorm,
                              LinearGELU,
                              init_bert_weights,
                              set_gradient_checkpointing,
)
from fastvl.nn.embeddings import RegionEmbeddings, TextEmbeddings
from fastvl.nn.geometry import VisualFeatureEmbedding, box_geometry_embedding
from fastvl.nn.layers import CoAttentionLayer, CrossAttentionLayer, TransformerEncoder, TransformerLayer
from fastvl.nn.vision import PatchEmbedding, VisionTransformer, ViTBlock

__all__ = [
    "Checkpointable", "CoAttentionLayer", "CrossAttention", "CrossAttentionLayer", "FeedForward", "InputSharingLinear", "LayerNorm",
    "LinearGELU",
    "RegionEmbeddings", "SelfAttention", "TextEmbeddings", "TransformerEncoder", "TransformerLayer",
    "init_bert_weights", "set_gradient_checkpointing",
    "PatchEmbedding", "VisionTransformer", "ViTBlock", "VisualFeatureEmbedding", "box_geometry_embedding",
]
