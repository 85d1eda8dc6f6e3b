"""A small Vision Transformer for small images, prunable by attention heads and MLP hidden units.

Patch embedding (a strided conv), learned position embeddings, pre-norm blocks (multi-head
self-attention with explicit `qkv` / `proj` Linear layers, a GELU MLP), mean pooling over tokens, a
Linear head. The defaults (32 x 32 inputs, patch 4, width 192, depth 6, 6 heads of 32) are a common
CIFAR-size ViT; the kwargs make it small enough for 8 x 8 digits on a CPU.

Pruning a head removes its q, k and v rows of `qkv` and its input columns of `proj`; the attention
block declares that group itself (`tpp_channel_groups`), and counts its heads from the shapes, so a
pruned block needs no other change. The residual stream (width) is not pruned: it runs through
LayerNorms, whose statistics removal would change.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tpp.models.cifar_resnet import _image_channels
from tpp.models.registry import register_model
from tpp.pruning.graph import Followers, Link


class Attention(nn.Module):
    """Multi-head self-attention; rows of `qkv` are laid out [q | k | v], each [head, head_dim]."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.head_dim = head_dim
        self.qkv = nn.Linear(dim, 3 * heads * head_dim)
        self.proj = nn.Linear(heads * head_dim, dim)

    @property
    def heads(self) -> int:
        return self.qkv.out_features // (3 * self.head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, self.heads * self.head_dim))

    def tpp_channel_groups(self, prefix: str) -> dict[str, Followers]:
        """Heads as units: pruning head h takes its q, k, v rows of qkv and its columns of proj."""
        h, d = self.heads, self.head_dim
        rows = range(3 * h * d)
        return {f"{prefix}qkv": Followers(
            filters=(Link(f"{prefix}qkv", tuple(rows), tuple((r // d) % h for r in rows)),),
            norms=(),
            consumers=(Link(f"{prefix}proj", tuple(range(h * d)), tuple(c // d for c in range(h * d))),),
            units=h)}


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, hidden: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads, head_dim)
        self.norm2, self.mlp = nn.LayerNorm(dim), MLP(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, image_size: tuple[int, int], in_channels: int, num_classes: int, patch: int = 4,
                 dim: int = 192, depth: int = 6, heads: int = 6, mlp_ratio: float = 2.0):
        super().__init__()
        if image_size[0] % patch or image_size[1] % patch:
            raise ValueError(f"vit: patch {patch} must divide the image size {image_size}")
        if dim % heads:
            raise ValueError(f"vit: dim {dim} must be a multiple of heads {heads}")
        tokens = (image_size[0] // patch) * (image_size[1] // patch)
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, dim))
        hidden = round(dim * mlp_ratio)
        self.blocks = nn.Sequential(*[Block(dim, heads, dim // heads, hidden) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        return self.head(self.norm(self.blocks(x)).mean(dim=1))


# Every block's attention heads and MLP hidden units, at the study's ratio.
VIT_PRESET: dict[str, str | float] = {"blocks.*.attn.qkv": "pr", "blocks.*.mlp.fc1": "pr"}


@register_model("vit", prune_preset=VIT_PRESET, coupling="groups")
def vit(num_classes: int, input_shape: tuple[int, ...], patch: int = 4, dim: int = 192, depth: int = 6,
        heads: int = 6, mlp_ratio: float = 2.0) -> nn.Module:
    """ViT for small images (default 32 x 32, patch 4, width 192, depth 6, 6 heads, MLP 2x)."""
    c = _image_channels("vit", input_shape)
    size = (int(input_shape[1]), int(input_shape[2]))
    return ViT(size, c, num_classes, patch, dim, depth, heads, mlp_ratio)
