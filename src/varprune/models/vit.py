"""A small Vision Transformer for 28 and 32 pixel inputs (patch 4: 7x7 or 8x8 tokens).

Attention projections are ``nn.Linear`` layers, so the query/key/value and
output projections are prunable weights like any other linear layer. The
patch embedding is a strided convolution (also prunable); positional
embedding and class token are not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import ModelError, check_int, register_model


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, in_channels, num_classes, image_size=32, patch=4, dim=192, depth=12, heads=3):
        super().__init__()
        self.patch = patch
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, patch)
        grid = image_size // patch
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, grid * grid + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


@register_model(
    "vit_tiny", "ViT-Tiny, patch 4, dim 192, depth 12, 3 heads (5.3M weights; options patch, dim, depth, heads)"
)
def vit_tiny(in_channels=3, num_classes=10, image_size=32, patch=4, dim=192, depth=12, heads=3):
    """The options make other ViTs of the same design (dim=96, depth=6: 0.67M weights)."""
    check_int("patch", patch, 1, image_size)
    check_int("dim", dim, 1, 16384)
    check_int("depth", depth, 1, 256)
    check_int("heads", heads, 1, 1024)
    if dim % heads:
        raise ModelError(f"dim ({dim}) must be a multiple of heads ({heads})")
    return ViT(in_channels, num_classes, image_size=image_size, patch=patch, dim=dim, depth=depth, heads=heads)
