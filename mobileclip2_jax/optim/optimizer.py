"""AdamW as the reference trains MobileCLIP (open_clip ``main.py``/``scheduler.py``), in optax.

* **AdamW with torch semantics**: decoupled weight decay ``p ← p − lr·(adam + wd·p)`` (optax's
  ``adamw`` equals torch's ``p·(1 − lr·wd) − lr·adam``), bias-corrected moments with ``eps``
  added after the square root, as ``torch.optim.AdamW``. β1 0.9, β2 0.95 (the released scripts);
  eps 1e-6 for ViT towers and 1e-8 otherwise (open_clip picks by model name, §3.3).
* **No weight decay** for ``ndim < 2`` parameters, norms, biases, the logit scale and the
  positional / class embeddings (the issue's rule; open_clip's name rule would decay ViT
  ``pos_embed``/``cls_token``, which are 3-D — a documented departure).
* **Schedule**: linear warmup ``base·(step+1)/warmup``, then cosine from ``base`` to ``min_lr``
  over the remaining steps (open_clip's ``cosine_lr`` with a floor; ``min_lr=0`` is open_clip's).
* **Global-norm clipping** (1.0) before AdamW, as ``clip_grad_norm_``.
* **Non-finite updates are skipped** (``optax.apply_if_finite``): params and moments unchanged,
  counted in the state; :func:`check_finite` turns K consecutive skips into a clear error.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

# Parameters of ndim ≥ 2 that are still not decayed, matched on exact path components (a
# substring rule would also catch e.g. MobileOne's ``rbr_scale`` conv kernels, which are decayed).
NO_DECAY_NAMES = ("logit_scale", "positional_embedding", "pos_embed", "cls_token", "class_embedding")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 1e-3
    warmup_steps: int = 1000
    total_steps: int = 10000
    min_lr: float = 0.0
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.2
    grad_clip_norm: float = 1.0          # 0 disables clipping
    max_consecutive_nonfinite: int = 10  # abort after this many skipped steps in a row

    def __post_init__(self):
        if not self.learning_rate > 0 or self.min_lr < 0 or self.min_lr > self.learning_rate:
            raise ValueError(f"need learning_rate > 0 and 0 ≤ min_lr ≤ learning_rate; got "
                             f"{self.learning_rate}, {self.min_lr}")
        if self.total_steps < 1 or not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"need total_steps ≥ 1 and 0 ≤ warmup_steps ≤ total_steps; got "
                             f"{self.warmup_steps}, {self.total_steps}")
        if self.max_consecutive_nonfinite < 1:
            raise ValueError(f"max_consecutive_nonfinite must be ≥ 1; got {self.max_consecutive_nonfinite}")


def default_eps(model_name: str) -> float:
    """open_clip ``get_default_params``: 1e-6 when the name contains "vit", else 1e-8 (so
    MobileCLIP-B, whose name has no "vit", trains with 1e-8)."""
    return 1e-6 if "vit" in model_name.lower() else 1e-8


def lr_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    base, floor, warm, total = cfg.learning_rate, cfg.min_lr, cfg.warmup_steps, cfg.total_steps

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warmup = base * (step + 1.0) / max(warm, 1)
        e = step - warm
        es = max(total - warm, 1)
        cosine = floor + 0.5 * (1.0 + jnp.cos(math.pi * jnp.clip(e / es, 0.0, 1.0))) * (base - floor)
        return jnp.where(step < warm, warmup, cosine)
    return schedule


def _path_names(path) -> list:
    return [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))).lower() for k in path]


def weight_decay_mask(params: Any) -> Any:
    """True where weight decay applies (see the module doc); same tree as ``params``."""
    def decays(path, leaf):
        if jnp.ndim(leaf) < 2:
            return False
        return not set(_path_names(path)) & set(NO_DECAY_NAMES)  # norms/biases are 1-D: covered above
    return jax.tree_util.tree_map_with_path(decays, params)


def build_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """clip → AdamW(schedule, mask), skipped when the gradients are not finite."""
    inner = optax.adamw(lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, mask=weight_decay_mask)
    if cfg.grad_clip_norm:
        inner = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), inner)
    # counts are kept; the training loop aborts via check_finite (apply_if_finite itself would
    # start applying non-finite updates after max_consecutive_errors)
    return optax.apply_if_finite(inner, max_consecutive_errors=2 ** 30)


def check_finite(opt_state: Any, cfg: OptimizerConfig, step: int) -> None:
    """Raises after ``max_consecutive_nonfinite`` skipped updates in a row (host-side check)."""
    n = int(opt_state.notfinite_count)
    if n >= cfg.max_consecutive_nonfinite:
        raise FloatingPointError(f"step {step}: {n} consecutive steps had a non-finite loss or gradient "
                                 f"(updates skipped, params unchanged); aborting — lower the learning "
                                 f"rate, check the data (launch/inspect_data.py) or use fp32")
