"""The MobileCLIP training objective: Σ over caption sets of (1−λ)·CLIP + λ·KD.

The same augmented images are paired once with the ground-truth captions and once with the
synthetic captions, and the two totals are **added** (the reference ``DRClipLoss``; paper Eq. 1).
Every component is returned for logging.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from mobileclip2_jax.losses.contrastive import clip_loss
from mobileclip2_jax.losses.distill import check_teachers, distill_loss


def reinforced_loss(image_features: jax.Array, text_features: jax.Array, logit_scale: jax.Array,
                    teacher_image: jax.Array, teacher_text: jax.Array, *, teacher_dims: Sequence[int],
                    teacher_scales: Sequence[float], distill_weight: float,
                    syn_text_features: Optional[jax.Array] = None, teacher_syn_text: Optional[jax.Array] = None,
                    average: str = "after_softmax", row_sharding: Optional[NamedSharding] = None
                    ) -> Dict[str, jax.Array]:
    """``{"loss", "clip_gt", "distill_gt"[, "clip_syn", "distill_syn"], "contrastive_loss",
    "distill_loss"}``; the last two are the reference's logged sums (already weighted)."""
    check_teachers(teacher_dims, teacher_scales)
    lam = float(distill_weight)
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"distill_weight (λ) must be in [0, 1]; got {distill_weight}")
    if (syn_text_features is None) != (teacher_syn_text is None):
        raise ValueError("syn_text_features and teacher_syn_text come together (or neither)")
    out: Dict[str, jax.Array] = {}
    sets = [("gt", text_features, teacher_text)]
    if syn_text_features is not None:
        sets.append(("syn", syn_text_features, teacher_syn_text))
    contrastive = distill = jnp.float32(0.0)
    for name, txt, t_txt in sets:
        c = clip_loss(image_features, txt, logit_scale, row_sharding=row_sharding)
        d = distill_loss(image_features, txt, logit_scale, teacher_image, t_txt, teacher_dims, teacher_scales,
                         average=average, row_sharding=row_sharding)
        out[f"clip_{name}"], out[f"distill_{name}"] = c, d
        contrastive, distill = contrastive + (1.0 - lam) * c, distill + lam * d
    out["contrastive_loss"], out["distill_loss"] = contrastive, distill
    out["loss"] = contrastive + distill
    return out
