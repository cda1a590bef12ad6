"""The optax optimizer against ``torch.optim.AdamW`` + ``clip_grad_norm_`` + open_clip's schedule.

Six steps (two of warmup, then cosine to a floor) on a parameter tree shaped like a tower's —
a conv kernel (decayed), a norm's scale and bias, a 3-D positional embedding and the logit scale
(not decayed) — with the same gradients: parameters agree with torch's after every step. Also the
decay mask on a real variant's parameter tree, the schedule's values, and that a non-finite
gradient leaves the parameters untouched, is counted, and aborts after K in a row.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import requires_torch
from mobileclip2_jax.optim.optimizer import (OptimizerConfig, build_optimizer, check_finite, default_eps,
                                             lr_schedule, weight_decay_mask)

CFG = OptimizerConfig(learning_rate=3e-3, warmup_steps=2, total_steps=6, min_lr=1e-4, eps=1e-8,
                      weight_decay=0.2, grad_clip_norm=1.0)


def _params(rng):
    return {"visual": {"conv": {"kernel": rng.standard_normal((3, 3, 4, 8)).astype(np.float32)},
                       "norm": {"scale": np.ones(8, np.float32), "bias": np.zeros(8, np.float32)},
                       "pos_embed": rng.standard_normal((1, 5, 8)).astype(np.float32) * 0.02},
            "logit_scale": np.float32(math.log(1 / 0.07))}


def _reference_lr(step):
    if step < CFG.warmup_steps:
        return CFG.learning_rate * (step + 1) / CFG.warmup_steps
    e, es = step - CFG.warmup_steps, CFG.total_steps - CFG.warmup_steps
    return CFG.min_lr + 0.5 * (1 + math.cos(math.pi * e / es)) * (CFG.learning_rate - CFG.min_lr)


def test_schedule_values():
    sched = lr_schedule(CFG)
    for step in range(8):
        assert float(sched(step)) == pytest.approx(_reference_lr(min(step, CFG.total_steps)), rel=1e-6)
    assert float(sched(CFG.total_steps)) == pytest.approx(CFG.min_lr, rel=1e-6)


@requires_torch
def test_matches_torch_adamw_with_clipping_and_schedule():
    import torch
    rng = np.random.default_rng(0)
    params = _params(rng)
    grads = [jax.tree.map(lambda p: (rng.standard_normal(np.shape(p)) * 0.5).astype(np.float32), params)
             for _ in range(CFG.total_steps)]
    leaves, treedef = jax.tree_util.tree_flatten(params)
    mask_leaves = jax.tree_util.tree_leaves(weight_decay_mask(params))
    assert mask_leaves == [False, True, False, False, False]  # logit_scale, kernel, bias, scale, pos_embed
    tparams = [torch.tensor(np.array(p, np.float32), requires_grad=True) for p in leaves]
    opt = torch.optim.AdamW([{"params": [t for t, m in zip(tparams, mask_leaves) if m], "weight_decay": CFG.weight_decay},
                             {"params": [t for t, m in zip(tparams, mask_leaves) if not m], "weight_decay": 0.0}],
                            lr=CFG.learning_rate, betas=(CFG.b1, CFG.b2), eps=CFG.eps)
    tx = build_optimizer(CFG)
    state = tx.init(params)
    step_fn = jax.jit(lambda p, g, s: (lambda u, s2: (jax.tree.map(jnp.add, p, u), s2))(*tx.update(g, s, p)))
    for step, g in enumerate(grads):
        for t, gl in zip(tparams, jax.tree_util.tree_leaves(g)):
            t.grad = torch.tensor(np.array(gl))
        torch.nn.utils.clip_grad_norm_(tparams, CFG.grad_clip_norm)
        for group in opt.param_groups:
            group["lr"] = _reference_lr(step)
        opt.step()
        params, state = step_fn(params, g, state)
        for t, p in zip(tparams, jax.tree_util.tree_leaves(params)):
            ref = t.detach().numpy()
            np.testing.assert_allclose(np.asarray(p), ref, atol=2e-6 * max(1.0, float(np.abs(ref).max())), rtol=0,
                                       err_msg=f"step {step}")


def test_decay_mask_on_a_real_variant():
    from mobileclip2_jax.factory import random_variables
    from mobileclip2_jax.models.clip import CLIP
    from mobileclip2_jax.models.zoo import get_model_spec, image_tower_config, text_tower_config
    spec = get_model_spec("MobileCLIP2-B")
    module = CLIP(image_tower_config(spec, 64), text_tower_config(spec))
    params = jax.eval_shape(lambda: random_variables(module))["params"]
    mask = weight_decay_mask(params)
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): (leaf, m) for (path, leaf), m in zip(
        jax.tree_util.tree_flatten_with_path(params)[0], jax.tree_util.tree_leaves(mask))}
    assert flat["logit_scale"][1] is False
    assert not flat["text/positional_embedding"][1] and not flat["visual/pos_embed"][1]
    assert not flat["visual/cls_token"][1]
    assert flat["text/token_embedding"][1] and flat["text/text_projection"][1]
    for name, (leaf, m) in flat.items():
        if len(leaf.shape) < 2:
            assert not m, name
        elif name.endswith("kernel"):
            assert m, name
    n_2d = sum(len(leaf.shape) >= 2 for leaf, _ in flat.values())
    assert sum(m for _, m in flat.values()) == n_2d - 3  # all ≥2-D but pos_embed, cls_token, positional_embedding


def test_nonfinite_gradients_skip_the_update_and_abort_after_k():
    cfg = OptimizerConfig(learning_rate=1e-3, warmup_steps=0, total_steps=10, max_consecutive_nonfinite=3)
    params = _params(np.random.default_rng(1))
    tx = build_optimizer(cfg)
    state = tx.init(params)
    bad = jax.tree.map(lambda p: np.full(np.shape(p), np.nan, np.float32), params)
    for k in range(1, 4):
        updates, state = tx.update(bad, state, params)
        new = jax.tree.map(jnp.add, params, updates)
        for a, b in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(params)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert int(state.notfinite_count) == k
        if k < 3:
            check_finite(state, cfg, k)
    with pytest.raises(FloatingPointError, match="3 consecutive steps had a non-finite"):
        check_finite(state, cfg, 3)
    good = jax.tree.map(lambda p: np.ones(np.shape(p), np.float32), params)
    _, state = tx.update(good, state, params)
    assert int(state.notfinite_count) == 0  # a finite step resets the run


def test_config_errors_and_eps_rule():
    assert default_eps("MobileCLIP2-B") == 1e-8 and default_eps("ViT-B-16") == 1e-6
    with pytest.raises(ValueError, match="min_lr"):
        OptimizerConfig(learning_rate=1e-3, min_lr=1e-2)
    with pytest.raises(ValueError, match="warmup_steps"):
        OptimizerConfig(warmup_steps=20, total_steps=10)
