"""ViT image towers of MobileCLIP-B / MobileCLIP2-B (ViT-B/16 with a conv stem) and -L-14.

Ports of timm ``vit_base_mci_224`` and ``vit_large_patch14_clip_224`` as open_clip wraps them
(``timm_pool="token"``, ``head`` = Linear to the CLIP embedding dim):
- ViT-B/16-MCi: ConvStem (conv 4×4/4 + BN + GELU, conv 2×2/2 + BN + GELU, conv 2×2/2 with
  bias) → 14×14 tokens; ``no_embed_class``: the positional table is added to the patch tokens
  *before* the class token is prepended; LayerNorm eps 1e-6 (timm's). Apple's v1 ``vit_b16``
  differs only in stem padding 1 and LN eps 1e-5 (``architecture.md`` §2.3): config fields.
- ViT-L/14: patch conv without bias, class token, positional table over all 257 tokens,
  ``norm_pre`` LayerNorm, LN eps 1e-5.
Blocks are pre-norm (attention with qkv bias, heads of 64; MLP 4×, exact GELU); the final
LN runs over all tokens and the class token is pooled.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from mobileclip2_jax.models.layers import BatchNorm, Conv2d, Dense, LayerNorm, gelu

Dtype = Any


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    name: str
    stem: str                 # "mci_conv" (ViT-B/16 conv stem) | "patch" (plain patch conv)
    width: int
    depth: int
    heads: int
    embed_dim: int            # head output (the CLIP embedding dim)
    patch_size: int = 16
    image_size: int = 224
    ln_eps: float = 1e-6
    stem_padding: int = 0     # first conv of the MCi stem: 0 (timm/open_clip), 1 (Apple v1)
    no_embed_class: bool = True
    pre_norm: bool = False
    mlp_ratio: float = 4.0

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


VIT_CONFIGS = {
    "vit_b16_mci": ViTConfig("vit_b16_mci", "mci_conv", 768, 12, 12, 512),
    "vit_b16_mci_apple": ViTConfig("vit_b16_mci_apple", "mci_conv", 768, 12, 12, 512, ln_eps=1e-5,
                                   stem_padding=1),
    "vit_l14": ViTConfig("vit_l14", "patch", 1024, 24, 16, 768, patch_size=14, ln_eps=1e-5,
                         no_embed_class=False, pre_norm=True),
}


class ViTBlock(nn.Module):
    heads: int
    ln_eps: float
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, w = x.shape
        hd = w // self.heads
        y = LayerNorm(self.ln_eps, name="norm1")(x)
        qkv = Dense(3 * w, dtype=self.dtype, name="qkv")(y).reshape(b, n, 3, self.heads, hd)
        q, k, v = jnp.moveaxis(qkv, 2, 0)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q * hd ** -0.5, k)
        probs = jax.nn.softmax(logits.astype(jnp.promote_types(self.dtype, jnp.float32)), -1)
        y = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(self.dtype), v).reshape(b, n, w)
        x = x + Dense(w, dtype=self.dtype, name="proj")(y)
        y = Dense(int(w * self.mlp_ratio), dtype=self.dtype, name="fc1")(LayerNorm(self.ln_eps, name="norm2")(x))
        return x + Dense(w, dtype=self.dtype, name="fc2")(gelu(y))


class ViT(nn.Module):
    """``images (B, H, W, 3) → (B, embed_dim)`` un-normalized image embeddings."""
    config: ViTConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        cfg = self.config
        side = cfg.image_size
        if x.ndim != 4 or x.shape[-1] != 3 or x.shape[1:3] != (side, side):
            raise ValueError(f"{cfg.name}: expected images of shape (batch, {side}, {side}, 3) NHWC; "
                             f"got {tuple(x.shape)}")
        w = cfg.width
        if cfg.stem == "mci_conv":
            p = cfg.stem_padding
            x = Conv2d(w // 4, 4, 4, padding=((p, p), (p, p)), dtype=self.dtype, name="stem_0")(x)
            x = gelu(BatchNorm(name="stem_0_bn")(x, train))
            x = Conv2d(w // 4, 2, 2, padding=((0, 0), (0, 0)), dtype=self.dtype, name="stem_1")(x)
            x = gelu(BatchNorm(name="stem_1_bn")(x, train))
            x = Conv2d(w, 2, 2, padding=((0, 0), (0, 0)), use_bias=True, dtype=self.dtype, name="stem_2")(x)
        else:
            x = Conv2d(w, cfg.patch_size, cfg.patch_size, padding=((0, 0), (0, 0)),
                       use_bias=not cfg.pre_norm, dtype=self.dtype, name="patch_embed")(x)
        b = x.shape[0]
        x = x.reshape(b, -1, w)
        cls = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, w))
        n_pos = cfg.num_patches if cfg.no_embed_class else cfg.num_patches + 1
        pos = self.param("pos_embed", nn.initializers.truncated_normal(0.02), (1, n_pos, w))
        cls = jnp.broadcast_to(cls.astype(x.dtype), (b, 1, w))
        if cfg.no_embed_class:
            x = jnp.concatenate([cls, x + pos.astype(x.dtype)], axis=1)
        else:
            x = jnp.concatenate([cls, x], axis=1) + pos.astype(x.dtype)
        if cfg.pre_norm:
            x = LayerNorm(cfg.ln_eps, name="norm_pre")(x)
        for i in range(cfg.depth):
            x = ViTBlock(cfg.heads, cfg.ln_eps, cfg.mlp_ratio, self.dtype, name=f"blocks_{i}")(x)
        x = LayerNorm(cfg.ln_eps, name="norm")(x)
        return Dense(cfg.embed_dim, dtype=self.dtype, name="head")(x[:, 0])
