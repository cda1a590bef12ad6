"""MCi0–MCi4 against timm's ``fastvit_mci*``: outputs, reparameterization, weights, counts.

Each variant is built in PyTorch with random init, randomized BN statistics/affine params and
layer scales, in eval mode, fp32. Tolerance: max|JAX − torch| ≤ 1e-5 · max|torch|.
MCi3/MCi4 run at 128 px (final map 2×2, every stage exercised) to keep CI fast.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import randomize_torch_model, requires_torch, timm, torch
from mobileclip2_jax.convert.mci_layout import mci_from_torch, mci_to_torch
from mobileclip2_jax.models.mci import MCi, get_mci_config
from mobileclip2_jax.models.reparam import reparameterize

pytestmark = requires_torch

VARIANTS = ["mci0", "mci1", "mci2", "mci3", "mci4"]
SIZES = {"mci0": 256, "mci1": 256, "mci2": 256, "mci3": 128, "mci4": 128}
# Parameter counts of timm's models with their default heads (issue #2).
TIMM_PARAMS_M = {"mci0": 11.41, "mci1": 21.54, "mci2": 35.82, "mci3": 125.24, "mci4": 321.78}
RTOL = 1e-5


def rel_err(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.fixture(scope="module", params=VARIANTS)
def variant(request):
    """Module-scoped so pytest runs all tests of one variant together (one reference build)."""
    return request.param


@functools.lru_cache(maxsize=1)
def reference(variant):
    """(timm model, its reparameterized copy, input NCHW, outputs of both) for a variant."""
    from timm.utils.model import reparameterize_model
    cfg = get_mci_config(variant)
    torch.manual_seed(0)
    model = timm.create_model(f"fastvit_{variant}", num_classes=cfg.num_classes).eval()
    randomize_torch_model(model, seed=1)
    x = torch.randn(2, 3, SIZES[variant], SIZES[variant], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model(x).numpy()
    fused = reparameterize_model(model)
    with torch.no_grad():
        out_fused = fused(x).numpy()
    return model, fused, x, out, out_fused


def run_jax(cfg, variables, x_nchw, inference=False):
    x = jnp.asarray(x_nchw.numpy().transpose(0, 2, 3, 1))
    with jax.default_matmul_precision("highest"):
        return np.asarray(jax.jit(MCi(cfg, inference_mode=inference).apply)(variables, x))


def test_parameter_count_matches_timm(variant):
    model, *_ = reference(variant)
    cfg = get_mci_config(variant)
    ours = jax.eval_shape(MCi(cfg).init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    n_ours = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(ours["params"]))
    n_timm = sum(p.numel() for p in model.parameters())
    assert n_ours == n_timm
    assert round(n_timm / 1e6, 2) == TIMM_PARAMS_M[variant]


def test_train_and_reparameterized_forms_match_timm(variant):
    model, fused, x, out, out_fused = reference(variant)
    cfg = get_mci_config(variant)
    variables = mci_from_torch(model.state_dict(), cfg)
    ours = run_jax(cfg, variables, x)
    assert ours.shape == out.shape == (2, cfg.num_classes)
    assert rel_err(ours, out) <= RTOL

    folded = reparameterize(variables)
    ours_fused = run_jax(cfg, folded, x, inference=True)
    assert rel_err(ours_fused, out_fused) <= RTOL      # vs timm's own reparameterized model
    assert rel_err(ours_fused, ours) <= RTOL           # vs our train form

    # Our fold equals timm's fold, weight by weight (loaded through the inference key table).
    timm_folded = mci_from_torch(fused.state_dict(), cfg)
    assert jax.tree.structure(timm_folded) == jax.tree.structure(folded)
    for a, b in zip(jax.tree.leaves(folded), jax.tree.leaves(timm_folded)):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-6)


def test_torch_flax_torch_round_trip_is_bit_exact(variant):
    model, fused, *_ = reference(variant)
    cfg = get_mci_config(variant)
    for m, prefix in ((model, ""), (fused, "visual.trunk.")):
        sd = {prefix + k: v for k, v in m.state_dict().items()}
        back = mci_to_torch(mci_from_torch(sd, cfg), cfg, inference=m is fused, prefix=prefix)
        assert set(back) == set(sd)
        for k, v in sd.items():
            assert back[k].dtype == v.numpy().dtype, k
            assert back[k].shape == tuple(v.shape), k
            assert np.array_equal(back[k], v.numpy()), k
        # The exported dict loads strictly into the PyTorch model.
        m.load_state_dict({k[len(prefix):]: torch.from_numpy(v) for k, v in back.items()}, strict=True)


def test_float64_port_is_exact_with_large_layer_scales():
    """In float64 the port matches timm to ~1e-12 even where fp32 is ill-conditioned."""
    cfg = get_mci_config("mci0")
    torch.manual_seed(0)
    model = timm.create_model("fastvit_mci0", num_classes=cfg.num_classes).eval()
    randomize_torch_model(model, seed=3, gamma_range=(0.5, 1.0))
    model = model.double()
    x = torch.randn(1, 3, 128, 128, dtype=torch.float64)
    with torch.no_grad():
        ref = model(x).numpy()
    jax.config.update("jax_enable_x64", True)
    try:
        variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), mci_from_torch(model.state_dict(), cfg))
        out = jax.jit(MCi(cfg, dtype=jnp.float64).apply)(variables, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)))
        out_fused = jax.jit(MCi(cfg, inference_mode=True, dtype=jnp.float64).apply)(reparameterize(variables), jnp.asarray(x.numpy().transpose(0, 2, 3, 1)))
        assert out.dtype == jnp.float64
        assert rel_err(out, ref) <= 1e-10
        assert rel_err(out_fused, ref) <= 1e-10
    finally:
        jax.config.update("jax_enable_x64", False)


def test_train_mode_batchnorm_matches_torch():
    """Train mode: outputs use batch statistics and running stats update exactly as PyTorch."""
    cfg = get_mci_config("mci0")
    torch.manual_seed(0)
    model = timm.create_model("fastvit_mci0", num_classes=cfg.num_classes)
    randomize_torch_model(model, seed=4)
    variables = mci_from_torch(model.state_dict(), cfg)
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    model.train()
    with torch.no_grad():
        ref = model(x).numpy()
    xj = jnp.asarray(x.numpy().transpose(0, 2, 3, 1))
    with jax.default_matmul_precision("highest"):
        out, updates = jax.jit(lambda v, x: MCi(cfg).apply(v, x, train=True, mutable=["batch_stats"]))(variables, xj)
    assert rel_err(out, ref) <= RTOL
    updated_ref = mci_from_torch(model.state_dict(), cfg)["batch_stats"]
    flat_ref = jax.tree_util.tree_leaves_with_path(updated_ref)
    flat_ours = dict(jax.tree_util.tree_leaves_with_path(updates["batch_stats"]))
    assert len(flat_ours) == len(flat_ref)
    for path, ref_val in flat_ref:
        np.testing.assert_allclose(np.asarray(flat_ours[path]), ref_val, rtol=1e-5, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(path))
    # Running stats really moved (train mode is not silently eval mode).
    before = jax.tree.leaves(variables["batch_stats"])
    after = jax.tree.leaves(updates["batch_stats"])
    assert all(not np.allclose(a, b) for a, b in zip(before, after))
    # Eval mode uses the updated running statistics, like torch after the step.
    model.eval()
    with torch.no_grad():
        ref_eval = model(x).numpy()
    ours_eval = run_jax(cfg, {"params": variables["params"], "batch_stats": updates["batch_stats"]}, x)
    assert rel_err(ours_eval, ref_eval) <= RTOL


def test_open_clip_mobileclip2_s0_visual_matches():
    """The MCi0 tower as open_clip wraps it for MobileCLIP2-S0 (``model.visual``)."""
    import open_clip
    torch.manual_seed(0)
    model = open_clip.create_model("MobileCLIP2-S0", pretrained=None).eval()
    randomize_torch_model(model.visual, seed=6)
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = model.visual(x).numpy()
    cfg = get_mci_config("mci0")
    variables = mci_from_torch(model.state_dict(), cfg)  # full CLIP dict: prefix auto-detected
    assert rel_err(run_jax(cfg, variables, x), ref) <= RTOL
    exported = mci_to_torch(variables, cfg, prefix="visual.trunk.")
    full = model.state_dict()
    for k, v in exported.items():
        assert np.array_equal(v, full[k].numpy()), k
