"""CLIP contrastive loss over the *global* batch, written on the global view for ``jax.jit``.

open_clip computes, per rank, the local rows of the ``b_local × B`` logits against all-gathered
features (``--local-loss --gather-with-grad``). Under GSPMD the same happens when the logits are
constrained to be sharded by rows over the batch axes: each device builds its ``b_local × B``
block (the column operand is all-gathered; its gradient is a reduce-scatter) and no device holds
the ``B × B`` matrix. :func:`row_sharded` pins that layout; pass ``row_sharding=None`` on a
single device.

Everything is computed in float32 whatever the towers' dtype: at B = 65,536 a bf16 softmax
would lose the signal of the positive pair.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

LOGIT_SCALE_MAX = float(jnp.log(100.0))  # open_clip clamps logit_scale to [0, ln 100]


def row_sharded(x: jax.Array, row_sharding: Optional[NamedSharding]) -> jax.Array:
    """``x`` (a ``B × B`` logit matrix) constrained to row blocks, when a sharding is given."""
    return x if row_sharding is None else jax.lax.with_sharding_constraint(x, row_sharding)


def pair_logits(a: jax.Array, b: jax.Array, scale: jax.Array,
                row_sharding: Optional[NamedSharding] = None) -> jax.Array:
    """``scale · a bᵀ`` in float32, rows sharded like ``a``."""
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return row_sharded(jnp.asarray(scale, jnp.float32) * (a @ b.T), row_sharding)


def clip_loss(image_features: jax.Array, text_features: jax.Array, logit_scale: jax.Array, *,
              row_sharding: Optional[NamedSharding] = None) -> jax.Array:
    """½ [CE(image→text) + CE(text→image)] with the diagonal as labels (open_clip ``ClipLoss``).

    ``logit_scale`` is the *log* scale (the learnable parameter); features are L2-normalized
    ``[B, D]``. Returns the mean over the global batch, float32.
    """
    scale = jnp.exp(jnp.asarray(logit_scale, jnp.float32))
    img, txt = image_features.astype(jnp.float32), text_features.astype(jnp.float32)
    positive = scale * jnp.sum(img * txt, axis=-1)  # the diagonal, without gathering it
    i2t = jax.nn.logsumexp(pair_logits(img, txt, scale, row_sharding), axis=-1) - positive
    t2i = jax.nn.logsumexp(pair_logits(txt, img, scale, row_sharding), axis=-1) - positive
    return 0.5 * (jnp.mean(i2t) + jnp.mean(t2i))


def clamp_logit_scale(logit_scale: jax.Array) -> jax.Array:
    """open_clip's ``logit_scale.clamp_(0, ln 100)`` after every optimizer step."""
    return jnp.clip(logit_scale, 0.0, LOGIT_SCALE_MAX)
