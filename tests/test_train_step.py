"""The jitted train step on a tiny MCi + text CLIP (real CLIP BPE tokens of COCO captions).

Checked: the loss goes down on a fixed batch; the step on a 4×2 ``data × fsdp`` mesh (8 CPU
devices, subprocess) gives the same parameters and BatchNorm statistics as on one device —
BatchNorm statistics are over the global batch; a batch with a NaN pixel leaves parameters,
statistics and optimizer moments exactly as they were and is counted; the logit scale is clamped.
"""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Each test compiles a train step in a fresh 8-device process (~1–2 min on 2 cores); they run
# with MOBILECLIP2_SLOW_TESTS=1 until the training issue trims them into the CI budget.
slow = pytest.mark.skipif(os.environ.get("MOBILECLIP2_SLOW_TESTS") != "1",
                          reason="slow: set MOBILECLIP2_SLOW_TESTS=1")

_COMMON = textwrap.dedent("""
    import json, os
    import jax, jax.numpy as jnp, numpy as np
    from mobileclip2_jax.models.clip import CLIP
    from mobileclip2_jax.models.mci import MCiConfig
    from mobileclip2_jax.models.text import TextConfig
    from mobileclip2_jax.optim.optimizer import OptimizerConfig, build_optimizer
    from mobileclip2_jax.tokenizers.clip_bpe import ClipBpeTokenizer
    from mobileclip2_jax.train.step import LossConfig, create_train_state, make_train_step

    IMAGE = MCiConfig(name="tiny", layers=(1, 1), embed_dims=(8, 32), mlp_ratio=2.0,
                      token_mixers=("repmixer", "attention"), pos_embs=(False, True),
                      se_downsamples=(False, False), attn_norm="batchnorm", stem_use_scale_branch=True,
                      num_classes=16, image_size=32)
    TEXT = TextConfig(width=32, heads=2, layers=1, embed_dim=16)
    LOSS = LossConfig(teacher_dims=(8, 12), teacher_scales=(70.0, 60.0), distill_weight=0.75)
    CAPTIONS = ["a man riding a horse on a beach", "two dogs playing in the snow", "a plate of food",
                "a red bus on a city street", "a cat sleeping on a sofa", "people skiing down a hill",
                "a bowl of fruit on a table", "an airplane in a blue sky"]

    def unit(rng, *shape):
        x = rng.standard_normal(shape).astype(np.float32)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    def make_batch(seed=0, b=8):
        rng = np.random.default_rng(seed)
        tok = ClipBpeTokenizer()
        blocks = lambda: np.concatenate([unit(rng, b, 8), unit(rng, b, 12)], 1)
        return {"image": rng.random((b, 32, 32, 3), dtype=np.float32),
                "text": np.asarray(tok(CAPTIONS[:b]), np.int32),
                "syn_text": np.asarray(tok([c + " in the morning" for c in CAPTIONS[:b]]), np.int32),
                "image_emb": blocks(), "text_emb": blocks(), "syn_text_emb": blocks()}

    def setup(lr=3e-3):
        module = CLIP(IMAGE, TEXT)
        b = make_batch()
        variables = module.init(jax.random.PRNGKey(0), b["image"][:2], b["text"][:2])
        tx = build_optimizer(OptimizerConfig(learning_rate=lr, warmup_steps=0, total_steps=50))
        return module, tx, create_train_state(variables, tx)
""")


def _run(script, timeout=600):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, "-c", _COMMON + textwrap.dedent(script)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads([l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][0][7:])


@slow
def test_loss_decreases_and_bad_batches_change_nothing():
    out = _run("""
        module, tx, state = setup()
        step = make_train_step(module, tx, LOSS)
        batch = make_batch()
        losses = []
        for _ in range(12):
            state, m = step(state, batch)
            losses.append(float(m["loss"]))
        before = jax.tree.map(np.asarray, (state.params, state.batch_stats, state.opt_state))
        bad = dict(batch, image=batch["image"].copy())
        bad["image"][0, 0, 0, 0] = np.nan
        state, m = step(state, bad)
        after = jax.tree.map(np.asarray, (state.params, state.batch_stats, state.opt_state))
        same = all(np.array_equal(a, b, equal_nan=True) for a, b in
                   zip(jax.tree_util.tree_leaves(before[:2]), jax.tree_util.tree_leaves(after[:2])))
        moments = [np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(before[2].inner_state),
                                                         jax.tree_util.tree_leaves(after[2].inner_state))]
        keys = sorted(m)
        # a huge logit scale is clamped to ln 100 after the update
        state = state.replace(params={**state.params, "logit_scale": jnp.float32(9.0)})
        state, m2 = step(state, batch)
        print("RESULT " + json.dumps({"losses": losses, "same": same, "moments_same": all(moments),
                                      "skipped": bool(m["update_skipped"]), "count": int(m["nonfinite_count"]),
                                      "keys": keys, "clamped": float(state.params["logit_scale"]),
                                      "step": int(state.step)}))
    """)
    losses = out["losses"]
    assert losses[-1] < 0.8 * losses[0], losses
    assert out["same"] and out["moments_same"] and out["skipped"] and out["count"] == 1
    assert {"loss", "clip_gt", "clip_syn", "distill_gt", "distill_syn", "contrastive_loss", "distill_loss",
            "grad_norm", "param_norm", "logit_scale", "update_skipped"} <= set(out["keys"])
    assert out["clamped"] == pytest.approx(np.log(100.0), abs=1e-6)
    assert out["step"] == 14


@slow
def test_sharded_step_equals_single_device_with_global_batch_norm():
    out = _run("""
        from mobileclip2_jax.parallel.mesh import make_mesh, batch_sharding, logits_row_sharding
        from mobileclip2_jax.parallel.sharding import param_shardings
        module, tx, state = setup()
        batch = make_batch(b=8)
        batch = {k: np.concatenate([v, v[::-1]]) for k, v in batch.items()}  # 16 rows
        ref_state = state
        ref_step = make_train_step(module, tx, LOSS)
        for _ in range(2):
            ref_state, ref_m = ref_step(ref_state, batch)
        ref = jax.tree.map(np.asarray, (ref_state.params, ref_state.batch_stats))
        mesh = make_mesh(data=4, fsdp=2)
        _, tx2, state2 = setup()
        shard = lambda tree: jax.device_put(tree, param_shardings(tree, mesh, "fsdp", min_size=256))
        state2 = state2.replace(params=shard(state2.params), batch_stats=shard(state2.batch_stats),
                                opt_state=shard(state2.opt_state))
        step = make_train_step(module, tx2, LOSS, row_sharding=logits_row_sharding(mesh))
        gbatch = {k: jax.device_put(v, batch_sharding(mesh)) for k, v in batch.items()}
        for _ in range(2):
            state2, m = step(state2, gbatch)
        got = jax.tree.map(np.asarray, (state2.params, state2.batch_stats))
        rel = lambda a, b: float(np.abs(a - b).max() / max(1e-6, np.abs(b).max()))
        diffs = [rel(a, b) for a, b in zip(jax.tree_util.tree_leaves(got[0]), jax.tree_util.tree_leaves(ref[0]))]
        stats = [rel(a, b) for a, b in zip(jax.tree_util.tree_leaves(got[1]), jax.tree_util.tree_leaves(ref[1]))]
        n_sharded = sum(any(a is not None for a in x.sharding.spec)
                        for x in jax.tree_util.tree_leaves(state2.params))
        print("RESULT " + json.dumps({"max_rel": max(diffs), "stats_rel": max(stats), "loss": float(m["loss"]), "ref_loss": float(ref_m["loss"]),
                                      "n_sharded": n_sharded, "n_stats": len(jax.tree_util.tree_leaves(ref[1]))}))
    """)
    assert out["n_stats"] > 0 and out["n_sharded"] > 0
    assert out["loss"] == pytest.approx(out["ref_loss"], rel=1e-5)
    assert out["stats_rel"] <= 1e-4, out  # global BatchNorm: same statistics on 1 and 8 devices
    # Adam divides by √v, so float reduction-order differences in near-zero gradients become
    # relative parameter differences ~1e-4 after two steps; measured 3.3e-4
    assert out["max_rel"] <= 1e-3, out


def test_loss_config_errors():
    from mobileclip2_jax.train.step import LossConfig
    with pytest.raises(ValueError, match="1 teacher logit scales for 2 teachers"):
        LossConfig(teacher_dims=(8, 8), teacher_scales=(70.0,))
    with pytest.raises(ValueError, match="λ"):
        LossConfig(teacher_dims=(8,), teacher_scales=(70.0,), distill_weight=2.0)
