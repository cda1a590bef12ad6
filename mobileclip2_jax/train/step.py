"""One optimizer step of reinforced CLIP training, written on the global view for ``jax.jit``.

The batch arrives as global ``jax.Array``s sharded on the batch axis over the mesh
(``data/global_batch.py``); parameters are replicated or FSDP-sharded by rule
(``parallel/sharding.py``). Nothing here is per-device: GSPMD inserts the collectives.

* **BatchNorm statistics are over the global batch**: the towers' batch means and variances
  are plain reductions over the (sharded) batch axis, so XLA all-reduces them — results do not
  depend on the device count (tested: 1 device vs a 4×2 mesh). This differs from PyTorch DDP,
  whose BatchNorm normalizes with per-GPU statistics (SyncBN would match).
* The towers run in their configured dtype; the losses are fp32 (``losses/``).
* The logit scale is clamped to [0, ln 100] after every update (open_clip).
* A non-finite loss or gradient skips the update (``optim/``); the BatchNorm running statistics
  are kept too, so a bad batch leaves the state exactly as it was.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from mobileclip2_jax.losses.contrastive import clamp_logit_scale
from mobileclip2_jax.losses.distill import check_teachers
from mobileclip2_jax.losses.reinforced import reinforced_loss


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class LossConfig:
    teacher_dims: Tuple[int, ...]
    teacher_scales: Tuple[float, ...]
    distill_weight: float = 1.0            # λ; MobileCLIP2 uses 1.0 (pure distillation)
    average: str = "after_softmax"
    use_synthetic: bool = True             # the second caption set (B_syn)

    def __post_init__(self):
        check_teachers(self.teacher_dims, self.teacher_scales)
        if not 0.0 <= self.distill_weight <= 1.0:
            raise ValueError(f"distill_weight (λ) must be in [0, 1]; got {self.distill_weight}")


def create_train_state(variables: Dict[str, Any], tx: optax.GradientTransformation) -> TrainState:
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params))


def _forward(module, images, text, syn_text):
    image = module.encode_image(images, True, True)
    txt = module.encode_text(text, True, True)
    syn = module.encode_text(syn_text, True, True) if syn_text is not None else None
    return image, txt, syn, module.logit_scale


def make_train_step(module: Any, tx: optax.GradientTransformation, loss_config: LossConfig, *,
                    row_sharding: Optional[NamedSharding] = None
                    ) -> Callable[[TrainState, Dict[str, jax.Array]], Tuple[TrainState, Dict[str, jax.Array]]]:
    """``step(state, batch) -> (state, metrics)`` jitted; the old state's buffers are donated.

    ``batch``: ``image`` (B, H, W, 3) float, ``text`` (B, L) int, ``image_emb`` / ``text_emb``
    (B, ΣD) teacher embeddings, and with ``use_synthetic`` ``syn_text`` / ``syn_text_emb``.
    Place the state with the sharding rules before the first step (``parallel/sharding.py``);
    the layout then propagates. ``row_sharding`` pins the logits' layout.
    """
    cfg = loss_config

    def loss_fn(params, batch_stats, batch):
        variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
        syn = batch["syn_text"] if cfg.use_synthetic else None
        (img, txt, syn_f, logit_scale), mutated = module.apply(
            variables, batch["image"], batch["text"], syn, method=_forward, mutable=["batch_stats"])
        losses = reinforced_loss(img, txt, logit_scale, batch["image_emb"], batch["text_emb"],
                                 teacher_dims=cfg.teacher_dims, teacher_scales=cfg.teacher_scales,
                                 distill_weight=cfg.distill_weight, syn_text_features=syn_f,
                                 teacher_syn_text=batch["syn_text_emb"] if cfg.use_synthetic else None,
                                 average=cfg.average, row_sharding=row_sharding)
        return losses["loss"], (losses, mutated.get("batch_stats", {}))

    def step(state: TrainState, batch: Dict[str, jax.Array]):
        (_, (losses, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.batch_stats, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        params = {**params, "logit_scale": clamp_logit_scale(params["logit_scale"])}
        finite = opt_state.last_finite
        batch_stats = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_stats, state.batch_stats)
        metrics = dict(losses, grad_norm=optax.global_norm(grads), param_norm=optax.global_norm(params),
                       logit_scale=jnp.exp(params["logit_scale"]), update_skipped=jnp.logical_not(finite),
                       nonfinite_count=opt_state.notfinite_count)
        return TrainState(state.step + 1, params, batch_stats, opt_state), metrics

    return jax.jit(step, donate_argnums=(0,))


def batch_keys(loss_config: LossConfig) -> Sequence[str]:
    keys = ["image", "text", "image_emb", "text_emb"]
    return keys + (["syn_text", "syn_text_emb"] if loss_config.use_synthetic else [])
