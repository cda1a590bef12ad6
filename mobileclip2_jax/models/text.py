"""The base CLIP text tower (open_clip ``TextTransformer``) used by every MobileCLIP variant
except MobileCLIP-S0 v1 (whose MCt hybrid tower follows in issue #3).

Token embedding + learned positional embedding → ``layers`` pre-norm blocks (LN eps 1e-5,
heads of 64, MLP 4·width, exact GELU) → final LN over all tokens → the feature at the first
end-of-text token (the largest id, 49407) → ``@ text_projection``. Only the B towers use a
causal mask; there is never a padding mask, so text is always encoded at the full context
length (``shared/docs/architecture.md`` §3.1).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from mobileclip2_jax.models.layers import Dense, LayerNorm, gelu

Dtype = Any
EOT_TOKEN_ID = 49407


@dataclasses.dataclass(frozen=True)
class TextConfig:
    width: int
    heads: int
    layers: int
    embed_dim: int
    causal: bool = False
    context_length: int = 77
    vocab_size: int = 49408
    mlp_ratio: float = 4.0


TEXT_CONFIGS = {
    "base512": TextConfig(512, 8, 12, 512),                 # MobileCLIP2-S0/S2, MobileCLIP-S1/S2
    "base512_causal": TextConfig(512, 8, 12, 512, causal=True),  # MobileCLIP(2)-B
    "base768": TextConfig(768, 12, 12, 768),                # S3, S4, L-14
}


def check_token_ids(ids: np.ndarray, context_length: int, eot_id: int = EOT_TOKEN_ID) -> None:
    """Host-side validation: shape ``(B, context_length)``, ids in ``[0, eot_id]`` and an
    end-of-text token per row.

    Pooling takes the first position of the largest id; a row without ``eot_id`` would
    silently pool a wrong position, so it is an error here.
    """
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.shape[1] != context_length:
        raise ValueError(f"expected token ids of shape (batch, {context_length}) — always the full "
                         f"context, zero-padded; got shape {ids.shape}")
    if ids.dtype.kind not in "iu":
        raise ValueError(f"token ids must be integers; got dtype {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() > eot_id):
        bad = int(ids.max()) if ids.max() > eot_id else int(ids.min())
        raise ValueError(f"token id {bad} is outside the vocabulary [0, {eot_id}] (vocab size "
                         f"{eot_id + 1}); was the text tokenized for another vocabulary?")
    missing = np.flatnonzero(~(ids == eot_id).any(axis=1))
    if missing.size:
        raise ValueError(f"token id rows {missing[:10].tolist()} have no end-of-text token "
                         f"({eot_id}); tokenize with mobileclip2_jax.tokenizers")


class MultiheadSelfAttention(nn.Module):
    """``torch.nn.MultiheadAttention`` self-attention: fused q|k|v in_proj with bias, out_proj."""
    heads: int
    causal: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, w = x.shape
        hd = w // self.heads
        qkv = Dense(3 * w, dtype=self.dtype, name="in_proj")(x).reshape(b, n, 3, self.heads, hd)
        q, k, v = jnp.moveaxis(qkv, 2, 0)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q * hd ** -0.5, k)
        logits = logits.astype(jnp.promote_types(self.dtype, jnp.float32))
        if self.causal:
            logits = jnp.where(jnp.tril(jnp.ones((n, n), bool)), logits, -jnp.inf)
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, w)
        return Dense(w, dtype=self.dtype, name="out_proj")(out)


class ResidualAttentionBlock(nn.Module):
    heads: int
    mlp_ratio: float = 4.0
    causal: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = x.shape[-1]
        x = x + MultiheadSelfAttention(self.heads, self.causal, self.dtype, name="attn")(
            LayerNorm(1e-5, name="ln_1")(x))
        y = Dense(int(w * self.mlp_ratio), dtype=self.dtype, name="c_fc")(LayerNorm(1e-5, name="ln_2")(x))
        return x + Dense(w, dtype=self.dtype, name="c_proj")(gelu(y))


class TextTransformer(nn.Module):
    """``ids (B, context_length) int → (B, embed_dim)`` un-normalized text embeddings."""
    config: TextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        cfg = self.config
        if ids.ndim != 2 or ids.shape[1] != cfg.context_length:
            raise ValueError(f"expected token ids of shape (batch, {cfg.context_length}); got {ids.shape}")
        if not isinstance(ids, jax.core.Tracer):
            # End-of-text is the largest id of the vocabulary (CLIP BPE: 49407).
            check_token_ids(np.asarray(ids), cfg.context_length, eot_id=cfg.vocab_size - 1)
        tok = self.param("token_embedding", nn.initializers.normal(0.02), (cfg.vocab_size, cfg.width))
        pos = self.param("positional_embedding", nn.initializers.normal(0.01), (cfg.context_length, cfg.width))
        x = (jnp.take(tok, ids, axis=0) + pos).astype(self.dtype)
        for i in range(cfg.layers):
            x = ResidualAttentionBlock(cfg.heads, cfg.mlp_ratio, cfg.causal, self.dtype,
                                       name=f"resblocks_{i}")(x)
        x = LayerNorm(1e-5, name="ln_final")(x)
        pooled = x[jnp.arange(x.shape[0]), jnp.argmax(ids, axis=-1)]
        proj = self.param("text_projection", nn.initializers.normal(cfg.width ** -0.5),
                          (cfg.width, cfg.embed_dim))
        return jnp.dot(pooled.astype(self.dtype), proj.astype(self.dtype))
