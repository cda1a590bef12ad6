"""MobileCLIP-S0 (v1) "MCt" hybrid text tower, a Flax Linen port of Apple's ``mct`` encoder.

Reference: apple/ml-mobileclip ``mobileclip/text_encoder.py`` (``model_name: mct``),
``mobileclip/modules/text/repmixer.py`` and ``mobileclip/configs/mobileclip_s0.json``
(``shared/docs/architecture.md`` §3.2). It exists only in Apple's package (open_clip has no
counterpart), so the parity tests run against fixtures recorded from Apple's code
(``tests/fixtures/README.md``).

``ids (B, 77) → token embedding + positional table → [RepMixerBlock, 4 × pre-norm
transformer block, RepMixerBlock] → final LN over all tokens → feature at argmax(ids) (the
end-of-text token) → @ projection``. There is no causal and no padding mask, and the 11-tap
RepMixer convolutions mix neighbouring positions, so padding always contributes: encode at
the full context length, zero-padded, like the tokenizers produce.

The RepMixer blocks treat the sequence as a 1×L image (Apple permutes ``[B, L, C]`` to
``[B, C, 1, L]``; here ``[B, 1, L, C]`` NHWC) with depthwise ``(1, 11)`` kernels padded
``(0, 5)``. The image-side ``mci.MobileOneBlock``/``RepMixer`` take a square int kernel and
add a 1×1 scale branch for ``k > 1``, whereas Apple's text mixer (tuple kernel whose first
element is 1) has none, hence the small dedicated modules below. Their Flax names
(``token_mixer/{mixer,norm}/{identity,conv_kxk_0}``, ``layer_scale``) follow the image
towers, so :func:`mobileclip2_jax.models.reparam.reparameterize` folds them unchanged into
``token_mixer/reparam_conv``, the form ``MCtTextTransformer(cfg, inference_mode=True)``
builds. Like Apple's ``reparameterize_model``, the ConvFFN conv+BN and block layer scales
stay unfused.

Parameters: 42,441,216 in train form, 42,435,072 reparameterized (equal to Apple's).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from mobileclip2_jax.models.layers import (BatchNorm, Conv2d, ConvNorm, LayerNorm, gelu, layer_scale_param,
                                           trunc_normal_02)
from mobileclip2_jax.models.text import ResidualAttentionBlock, check_token_ids

Dtype = Any


@dataclasses.dataclass(frozen=True)
class MCtConfig:
    """Architecture of the MCt text tower (defaults: Apple ``mobileclip_s0.json``)."""
    width: int = 512
    heads: int = 8
    embed_dim: int = 512
    context_length: int = 77
    vocab_size: int = 49408
    kernel_size: int = 11                    # RepMixer / ConvFFN depthwise (1, k) kernels
    mlp_ratio: float = 4.0                   # ConvFFN hidden int(C·r); attention FFN ceil(C·r/16)·16
    layer_scale_init_value: float = 1e-5
    layout: Tuple[str, ...] = ("repmixer",) + ("transformer",) * 4 + ("repmixer",)

    def __post_init__(self):
        bad = [k for k in self.layout if k not in ("repmixer", "transformer")]
        if bad:
            raise ValueError(f"MCt layout entries must be 'repmixer' or 'transformer', got {bad}")
        if self.kernel_size % 2 != 1:
            raise ValueError(f"MCt kernel_size must be odd (symmetric padding), got {self.kernel_size}")
        if int(self.width * (self.ffn_dim / self.width)) != self.ffn_dim:
            raise ValueError(f"attention FFN width {self.ffn_dim} is not representable as "
                             f"int(width * ratio) for width {self.width}")

    @property
    def ffn_dim(self) -> int:
        """Apple ``TextTransformer``: ``ceil(dim · multiplier / 16) · 16`` (2048 here)."""
        return int(math.ceil(self.width * self.mlp_ratio / 16.0) * 16)

    @property
    def conv_ffn_dim(self) -> int:
        """Apple ``RepMixerBlock``: ``int(dim · mlp_ratio)`` (2048 here)."""
        return int(self.width * self.mlp_ratio)


MCT_CONFIGS = {"mct": MCtConfig()}


class SeqMobileOneBlock(nn.Module):
    """Apple ``MobileOneBlock(C, C, (1, k), padding=(0, k//2), groups=C, use_act=False)``.

    Train form only (the enclosing :class:`SeqRepMixer` owns the fused conv): BN identity
    branch plus ``num_conv_branches`` depthwise ``(1, k)`` conv+BN branches, no scale branch.
    """
    kernel_size: int
    num_conv_branches: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        c = x.shape[-1]
        y = BatchNorm(name="identity")(x, train).astype(self.dtype)
        for i in range(self.num_conv_branches):
            y = y + ConvNorm(c, (1, self.kernel_size), groups=c, dtype=self.dtype,
                             name=f"conv_kxk_{i}")(x, train)
        return y


class SeqRepMixer(nn.Module):
    """Apple text ``RepMixer``: ``x + ls ⊙ (mixer(x) − norm(x))``; one dw ``(1, k)`` conv fused."""
    kernel_size: int = 11
    layer_scale_init_value: float = 1e-5
    inference_mode: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        c = x.shape[-1]
        if self.inference_mode:
            return Conv2d(c, (1, self.kernel_size), groups=c, use_bias=True, dtype=self.dtype,
                          name="reparam_conv")(x)
        mixer = SeqMobileOneBlock(self.kernel_size, 1, self.dtype, name="mixer")(x, train)
        norm = SeqMobileOneBlock(self.kernel_size, 0, self.dtype, name="norm")(x, train)
        gamma = layer_scale_param(self, "layer_scale", c, self.layer_scale_init_value)
        return x + gamma.astype(self.dtype) * (mixer - norm)


class SeqConvFFN(nn.Module):
    """Apple text ``ConvFFN``: dw ``(1, k)`` conv + BN → 1×1 (C→hidden) → GELU → 1×1 (→C)."""
    hidden: int
    kernel_size: int = 11
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        c = x.shape[-1]
        x = ConvNorm(c, (1, self.kernel_size), groups=c, kernel_init=trunc_normal_02, dtype=self.dtype,
                     name="conv")(x, train)
        x = Conv2d(self.hidden, 1, use_bias=True, kernel_init=trunc_normal_02,
                   bias_init=nn.initializers.zeros, dtype=self.dtype, name="fc1")(x)
        return Conv2d(c, 1, use_bias=True, kernel_init=trunc_normal_02, bias_init=nn.initializers.zeros,
                      dtype=self.dtype, name="fc2")(gelu(x))


class TextRepMixerBlock(nn.Module):
    """Apple text ``RepMixerBlock`` on ``[B, L, C]``: token mixer, then ``x + ls ⊙ ConvFFN(x)``."""
    config: MCtConfig
    inference_mode: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        cfg = self.config
        c = x.shape[-1]
        x = x[:, None]  # [B, 1, L, C]: the sequence as a one-row image
        x = SeqRepMixer(cfg.kernel_size, cfg.layer_scale_init_value, self.inference_mode, self.dtype,
                        name="token_mixer")(x, train)
        y = SeqConvFFN(cfg.conv_ffn_dim, cfg.kernel_size, self.dtype, name="mlp")(x, train)
        gamma = layer_scale_param(self, "layer_scale", c, cfg.layer_scale_init_value)
        return (x + gamma.astype(self.dtype) * y)[:, 0]


class MCtTextTransformer(nn.Module):
    """``ids (B, context_length) int → (B, embed_dim)`` un-normalized MCt text embeddings.

    ``inference_mode=True`` builds the reparameterized form (RepMixers as one conv each); get
    its variables with :func:`mobileclip2_jax.models.reparam.reparameterize`. ``train=True``
    runs the BatchNorms on batch statistics (mutable ``batch_stats``), as PyTorch train mode.
    """
    config: MCtConfig = MCtConfig()
    inference_mode: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, ids: jax.Array, train: bool = False) -> jax.Array:
        cfg = self.config
        if ids.ndim != 2 or ids.shape[1] != cfg.context_length:
            raise ValueError(f"expected token ids of shape (batch, {cfg.context_length}) — always the "
                             f"full context, zero-padded; got {ids.shape}")
        if not isinstance(ids, jax.core.Tracer):
            # End-of-text is the largest id of the vocabulary (CLIP BPE: 49407).
            check_token_ids(np.asarray(ids), cfg.context_length, eot_id=cfg.vocab_size - 1)
        # Apple: nn.Embedding (N(0, 1)); positional table trunc_normal(std dim^-0.5).
        tok = self.param("token_embedding", nn.initializers.normal(1.0), (cfg.vocab_size, cfg.width))
        pos = self.param("positional_embedding", nn.initializers.truncated_normal(cfg.width ** -0.5),
                         (cfg.context_length, cfg.width))
        x = (jnp.take(tok, ids, axis=0) + pos).astype(self.dtype)
        for i, kind in enumerate(cfg.layout):
            if kind == "repmixer":
                x = TextRepMixerBlock(cfg, self.inference_mode, self.dtype, name=f"transformer_{i}")(x, train)
            else:
                x = ResidualAttentionBlock(cfg.heads, cfg.ffn_dim / cfg.width, causal=False, dtype=self.dtype,
                                           name=f"transformer_{i}")(x)
        x = LayerNorm(1e-5, name="ln_final")(x)
        pooled = x[jnp.arange(x.shape[0]), jnp.argmax(ids, axis=-1)]
        proj = self.param("text_projection", nn.initializers.normal(cfg.width ** -0.5),
                          (cfg.width, cfg.embed_dim))
        return jnp.dot(pooled.astype(self.dtype), proj.astype(self.dtype))
