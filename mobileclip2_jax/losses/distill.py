"""Distillation from stored teacher embeddings (MobileCLIP's multi-modal reinforced training).

Per teacher block ``k`` (columns of the concatenated stored embeddings, in the dataset's
order), teacher logits ``scale_k · A_k B_kᵀ`` are formed in-batch; the teacher distribution is
the **average over teachers of the row softmaxes** (the reference's
``--distill-average-after-softmax``, used for every released model) or, with
``average="before_softmax"``, the softmax of the summed scaled logits (the reference's other path,
which it only runs with one shared scale). The loss is the cross-entropy of the student's
log-softmax against it, image→text and text→image, averaged: equal to the paper's mean of KLs up
to the teachers' entropy, a constant (training_and_data.md §2.2).

Scales are *fixed* per teacher (70 and 60 for MobileCLIP2's DFN teachers, 100 for DataCompDR);
the student's own learned ``logit_scale`` forms the student logits. A scale count that does not
match the number of teacher blocks is a ``ValueError`` when the loss is built — never an index
error mid-run as in the reference (§2.4 item 1).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from mobileclip2_jax.losses.contrastive import pair_logits

AVERAGE_MODES = ("after_softmax", "before_softmax")


def check_teachers(teacher_dims: Sequence[int], teacher_scales: Sequence[float]) -> Tuple[Tuple[int, ...], Tuple[float, ...]]:
    dims, scales = tuple(int(d) for d in teacher_dims), tuple(float(s) for s in teacher_scales)
    if not dims or any(d <= 0 for d in dims):
        raise ValueError(f"teacher_dims must be positive block widths; got {teacher_dims}")
    if len(scales) != len(dims):
        raise ValueError(f"{len(scales)} teacher logit scales for {len(dims)} teachers (dims {dims}); "
                         f"give one scale per teacher, in the dataset's block order")
    if any(not s > 0 for s in scales):
        raise ValueError(f"teacher logit scales must be positive; got {scales}")
    return dims, scales


def teacher_log_probs(a: jax.Array, b: jax.Array, teacher_dims: Sequence[int], teacher_scales: Sequence[float],
                      average: str = "after_softmax", row_sharding: Optional[NamedSharding] = None) -> jax.Array:
    """log of the ensemble's row distribution over the columns, ``[B, B]`` float32."""
    if average not in AVERAGE_MODES:
        raise ValueError(f"average must be one of {AVERAGE_MODES}; got {average!r}")
    dims, scales = check_teachers(teacher_dims, teacher_scales)
    if a.shape[-1] != sum(dims) or b.shape[-1] != sum(dims):
        raise ValueError(f"teacher embeddings have width {a.shape[-1]}/{b.shape[-1]}; teacher_dims {dims} "
                         f"sum to {sum(dims)}")
    a, b = jax.lax.stop_gradient(a.astype(jnp.float32)), jax.lax.stop_gradient(b.astype(jnp.float32))
    starts = [sum(dims[:k]) for k in range(len(dims))]
    logits = [pair_logits(a[:, s:s + d], b[:, s:s + d], scale, row_sharding)
              for s, d, scale in zip(starts, dims, scales)]
    if average == "before_softmax":
        return jax.nn.log_softmax(sum(logits), axis=-1)
    log_p = jnp.stack([jax.nn.log_softmax(z, axis=-1) for z in logits])
    return jax.nn.logsumexp(log_p, axis=0) - jnp.log(float(len(dims)))


def distill_loss(image_features: jax.Array, text_features: jax.Array, logit_scale: jax.Array,
                 teacher_image: jax.Array, teacher_text: jax.Array, teacher_dims: Sequence[int],
                 teacher_scales: Sequence[float], *, average: str = "after_softmax",
                 row_sharding: Optional[NamedSharding] = None) -> jax.Array:
    """½ [H(P_T(i→t), Q_S(i→t)) + H(P_T(t→i), Q_S(t→i))], mean over the global batch."""
    scale = jnp.exp(jnp.asarray(logit_scale, jnp.float32))
    total = 0.0
    for s_a, s_b, t_a, t_b in ((image_features, text_features, teacher_image, teacher_text),
                               (text_features, image_features, teacher_text, teacher_image)):
        log_q = jax.nn.log_softmax(pair_logits(s_a, s_b, scale, row_sharding), axis=-1)
        log_p = teacher_log_probs(t_a, t_b, teacher_dims, teacher_scales, average, row_sharding)
        total = total + jnp.mean(-jnp.sum(jnp.exp(log_p) * log_q, axis=-1))
    return 0.5 * total
