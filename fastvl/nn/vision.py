"""The ViT-B/16 image encoder ALBEF uses: patch embedding with a [CLS] token and learned positions,
pre-LayerNorm blocks (LN eps 1e-6, exact GELU) and a final LayerNorm.

Attention runs through :func:`fastvl.ops.attention`, fed by one fused QKV projection whose output is
viewed as q, k, v (no copies). Parameter names follow the original (timm / ALBEF ``vit.py``):
``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.{i}.{norm1, attn.qkv, attn.proj, norm2,
mlp.fc1, mlp.fc2}``, ``norm``, so checkpoints map one to one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastvl import _checks
from fastvl.nn.common import Checkpointable
from fastvl.ops import attention, bias_gelu, layer_norm


class PatchEmbedding(nn.Module):
    """``[B, C, S, S]`` images -> ``[B, (S/P)^2, D]`` patch tokens (a stride-P convolution), row-major."""

    def __init__(self, image_size: int = 256, patch_size: int = 16, in_channels: int = 3, dim: int = 768):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
        self.image_size, self.patch_size, self.in_channels = image_size, patch_size, in_channels
        self.num_patches = (image_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        expected = f"[B, {self.in_channels}, {self.image_size}, {self.image_size}]"
        _checks.tensor("images", images, shape=expected, ndim=4)
        if tuple(images.shape[1:]) != (self.in_channels, self.image_size, self.image_size):
            raise ValueError(f"images must have shape {expected}, got {list(images.shape)}")
        return self.proj(images).flatten(2).transpose(1, 2)


class ViTAttention(nn.Module):
    """Self-attention with one fused ``qkv`` projection (output laid out ``[q | k | v]``, heads inside)."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.heads, self.head_dim, self.dropout = heads, dim // heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, return_probs: bool = False):
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, self.head_dim).unbind(2)  # views
        dropout = self.dropout if self.training else 0.0
        if return_probs:  # dispatched to a backend that materialises the probabilities
            context, probs = attention(q, k, v, dropout_p=dropout, return_probs=True)
            return self.proj(context.reshape(batch, length, dim)), probs
        return self.proj(attention(q, k, v, dropout_p=dropout).reshape(batch, length, dim))


class ViTBlock(Checkpointable):
    """Pre-LN transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))`` (exact GELU).
    LayerNorms run through :func:`fastvl.ops.layer_norm`, fc1's bias + GELU through
    :func:`fastvl.ops.bias_gelu`. Checkpointable (``gradient_checkpointing = True``, or
    :func:`fastvl.nn.set_gradient_checkpointing` on the model)."""

    def __init__(self, dim: int = 768, heads: int = 12, mlp_ratio: float = 4.0, eps: float = 1e-6,
                 attention_dropout: float = 0.0, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = ViTAttention(dim, heads, attention_dropout)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(dim, int(dim * mlp_ratio))
        self.mlp.fc2 = nn.Linear(int(dim * mlp_ratio), dim)
        self.dropout = nn.Dropout(dropout)

    def compute(self, x: torch.Tensor, return_probs: bool = False):
        attended = self.attn(_norm(self.norm1, x), return_probs)
        probs = None
        if return_probs:
            attended, probs = attended
        x = x + self.dropout(attended)
        hidden = bias_gelu(F.linear(_norm(self.norm2, x), self.mlp.fc1.weight), self.mlp.fc1.bias)
        x = x + self.dropout(self.mlp.fc2(self.dropout(hidden)))
        return (x, probs) if return_probs else x


def _norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """``norm`` through :func:`fastvl.ops.layer_norm` (the module only holds the parameters)."""
    return layer_norm(x, norm.weight, norm.bias, eps=norm.eps)


class VisionTransformer(nn.Module):
    """ViT image encoder: ``[B, 3, S, S]`` -> ``[B, 1 + (S/P)^2, D]`` (final LayerNorm applied to
    every token; token 0 is [CLS]). ALBEF-base: S = 256, P = 16, D = 768, 12 blocks, 12 heads."""

    def __init__(self, image_size: int = 256, patch_size: int = 16, dim: int = 768, depth: int = 12,
                 heads: int = 12, mlp_ratio: float = 4.0, eps: float = 1e-6, dropout: float = 0.0,
                 attention_dropout: float = 0.0):
        super().__init__()
        self.patch_embed = PatchEmbedding(image_size, patch_size, 3, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, dim))
        self.pos_drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(ViTBlock(dim, heads, mlp_ratio, eps, attention_dropout, dropout)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=eps)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_vit_weights)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens with [CLS] in front and positions added: ``[B, 1 + N, D]``."""
        patches = self.patch_embed(images)
        cls = self.cls_token.expand(patches.shape[0], -1, -1).to(patches.dtype)
        return self.pos_drop(torch.cat((cls, patches), dim=1) + self.pos_embed.to(patches.dtype))

    def forward(self, images: torch.Tensor, return_attention: bool = False):
        """With ``return_attention`` also returns each block's probabilities ``[B, H, N, N]``."""
        x = self.embed(images)
        probabilities = []
        for block in self.blocks:
            if return_attention:
                x, probs = block(x, True)
                probabilities.append(probs)
            else:
                x = block(x)
        x = _norm(self.norm, x)
        return (x, probabilities) if return_attention else x


def _init_vit_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def resize_pos_embed(pos_embed: torch.Tensor, num_patches: int) -> torch.Tensor:
    """``[1, 1 + n, D]`` -> ``[1, 1 + num_patches, D]``: bicubic interpolation of the patch grid, the
    [CLS] position kept (what ALBEF does to fine-tune a 256-px checkpoint at 384 px)."""
    old = pos_embed.shape[1] - 1
    old_side, new_side = math.isqrt(old), math.isqrt(num_patches)
    if old_side ** 2 != old or new_side ** 2 != num_patches:
        raise ValueError(f"pos_embed grids must be square, got {old} and {num_patches} patches")
    if old == num_patches:
        return pos_embed
    grid = pos_embed[:, 1:].reshape(1, old_side, old_side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(new_side, new_side), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, num_patches, -1).to(pos_embed.dtype)
    return torch.cat((pos_embed[:, :1], grid), dim=1)
