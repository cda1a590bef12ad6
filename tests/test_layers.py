"""Porting traps pinned by tests that fail if the trap is reintroduced."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import randomize_torch_model, requires_torch, torch
from mobileclip2_jax.convert.mci_layout import attention_block_keys, mobileone_keys
from mobileclip2_jax.convert.torch_layout import state_dict_to_variables
from mobileclip2_jax.models import layers
from mobileclip2_jax.models.mci import AttentionBlock, MCi, MobileOneBlock, get_mci_config


def nhwc(t):
    return jnp.asarray(t.detach().numpy().transpose(0, 2, 3, 1))


def to_nchw(a):
    return np.asarray(a).transpose(0, 3, 1, 2)


@requires_torch
@pytest.mark.parametrize("k,groups", [(3, 1), (7, 4), (1, 1), (3, 4)])
@pytest.mark.parametrize("size", [8, 9])
def test_stride2_conv_padding_is_symmetric(k, groups, size):
    """Impulses at the corners land where PyTorch's symmetric padding puts them."""
    c_in, c_out = 4, 8
    conv = layers.Conv2d(c_out, k, 2, groups=groups)
    w = jax.random.normal(jax.random.key(0), (k, k, c_in // groups, c_out))
    variables = {"params": {"kernel": w}}
    x = np.zeros((1, size, size, c_in), np.float32)
    x[0, 0, 0, :] = 1.0
    x[0, size - 1, size - 1, :] = 2.0
    x[0, size // 2, 1, :] = 3.0
    ours = to_nchw(jax.jit(conv.apply)(variables, jnp.asarray(x)))
    ref = torch.nn.functional.conv2d(
        torch.from_numpy(x.transpose(0, 3, 1, 2).copy()),
        torch.from_numpy(np.asarray(w).transpose(3, 2, 0, 1).copy()),
        stride=2, padding=((2 - 1) + (k - 1)) // 2, groups=groups).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    if k > 1 and size % 2 == 0:
        # XLA "SAME" pads asymmetrically here: it would give a different answer.
        same = jax.lax.conv_general_dilated(jnp.asarray(x), w, (2, 2), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            feature_group_count=groups)
        assert not np.allclose(to_nchw(same), ref, atol=1e-3)


@requires_torch
def test_gelu_is_exact_erf():
    x = np.linspace(-6, 6, 2001, dtype=np.float32)
    ref = torch.nn.GELU()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(layers.gelu(jnp.asarray(x)), ref, atol=1e-6)
    assert np.abs(np.asarray(jax.nn.gelu(jnp.asarray(x), approximate=True)) - ref).max() > 1e-4


@requires_torch
def test_batchnorm_matches_torch_train_and_eval():
    """eps 1e-5; biased var to normalize; unbiased var into running_var; momentum 0.1."""
    c = 6
    tbn = torch.nn.BatchNorm2d(c)
    assert tbn.eps == 1e-5 and layers.BatchNorm().epsilon == tbn.eps
    with torch.no_grad():
        tbn.weight.uniform_(0.5, 1.5); tbn.bias.normal_()
        tbn.running_mean.normal_(); tbn.running_var.uniform_(1e-4, 1e-3)  # small: eps matters
    variables = {"params": {"scale": jnp.asarray(tbn.weight.detach().numpy()),
                            "bias": jnp.asarray(tbn.bias.detach().numpy())},
                 "batch_stats": {"mean": jnp.asarray(tbn.running_mean.numpy()),
                                 "var": jnp.asarray(tbn.running_var.numpy())}}
    x = torch.randn(3, c, 5, 4) * 0.01
    bn = layers.BatchNorm()
    tbn.eval()
    np.testing.assert_allclose(to_nchw(bn.apply(variables, nhwc(x), train=False)),
                               tbn(x).detach().numpy(), rtol=1e-5, atol=1e-5)
    tbn.train()
    ref = tbn(x).detach().numpy()
    out, upd = bn.apply(variables, nhwc(x), train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(to_nchw(out), ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(upd["batch_stats"]["mean"], tbn.running_mean.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(upd["batch_stats"]["var"], tbn.running_var.numpy(), rtol=1e-6, atol=1e-9)


@requires_torch
@pytest.mark.parametrize("norm", ["batchnorm", "layernorm"])
def test_attention_block_norm_eps_matches_timm(norm):
    """MCi0–2 use BN before attention, MCi3/4 LayerNorm2d with eps 1e-5 (timm's default is
    1e-6). Low-variance inputs and running stats make a wrong eps visible."""
    from functools import partial
    from timm.layers import LayerNorm2d
    from timm.models.fastvit import AttentionBlock as TimmAttentionBlock
    dim = 64
    norm_layer = torch.nn.BatchNorm2d if norm == "batchnorm" else partial(LayerNorm2d, eps=1e-5)
    torch.manual_seed(0)
    block = TimmAttentionBlock(dim, mlp_ratio=3.0, norm_layer=norm_layer).eval()
    randomize_torch_model(block, var_range=(1e-5, 1e-4), gamma_range=(0.5, 1.0))
    x = 1.0 + 1e-3 * torch.randn(2, dim, 4, 4)
    with torch.no_grad():
        ref = block(x).numpy()
    variables = state_dict_to_variables({"blk." + k: v for k, v in block.state_dict().items()},
                                        attention_block_keys((), "blk", norm=norm))
    with jax.default_matmul_precision("highest"):
        ours = to_nchw(AttentionBlock(3.0, norm).apply(variables, nhwc(x)))
    scale = np.abs(ref - x.numpy()).max()  # compare the residual branch, not the identity
    assert np.abs(ours - ref).max() <= 1e-4 * scale


@requires_torch
def test_mobileone_block_with_tiny_running_var_matches_timm():
    from timm.models.fastvit import MobileOneBlock as TimmMobileOne
    torch.manual_seed(0)
    block = TimmMobileOne(8, 8, 3, stride=1, group_size=1, use_se=True).eval()
    randomize_torch_model(block, var_range=(1e-5, 1e-4))
    x = 1e-2 * torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        ref = block(x).numpy()
    table = mobileone_keys((), "blk", in_ch=8, out_ch=8, kernel=3, stride=1, inference=False, use_se=True)
    variables = state_dict_to_variables({"blk." + k: v for k, v in block.state_dict().items()}, table)
    ours = to_nchw(MobileOneBlock(8, 3, 1, groups=8, use_se=True).apply(variables, nhwc(x)))
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("shape,match", [
    ((256, 256, 3), "rank 3"),
    ((1, 3, 256, 256), "256 channels"),
    ((1, 256, 256, 4), "4 channels"),
    ((1, 16, 256, 3), "below the tower's total stride 32"),
])
def test_bad_image_input_raises_value_error_naming_expected_shape(shape, match):
    model = MCi(get_mci_config("mci0"))
    with pytest.raises(ValueError, match="expected images of shape \\(batch, height, width, 3\\)") as e:
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))
    assert match in str(e.value)


def test_mci34_need_at_least_64_px():
    with pytest.raises(ValueError, match="total stride 64"):
        jax.eval_shape(MCi(get_mci_config("mci3")).init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def test_unknown_variant_is_rejected():
    with pytest.raises(ValueError, match="unknown MCi variant 'mci9'"):
        get_mci_config("mci9")


def test_fast_erf_gelu_accuracy_and_gradient():
    from scipy.special import erf
    x = np.linspace(-10, 10, 400_001).astype(np.float32)
    assert np.abs(np.asarray(jax.jit(layers.erf_f32)(x)) - erf(x.astype(np.float64))).max() < 4e-7
    x64 = x.astype(np.float64)
    ref = 0.5 * x64 * (1 + erf(x64 / np.sqrt(2)))
    out = np.asarray(jax.jit(layers.gelu)(x))
    assert np.abs(out - ref).max() <= 2e-6                        # abs, includes |x| up to 10
    pos = x > 1e-2  # no 1 + erf cancellation here (the negative tail has it for any fp32 erf)
    assert (np.abs(out - ref)[pos] / np.abs(ref[pos])).max() <= 1e-6
    # The custom derivative is the analytic one, Φ(x) + x φ(x).
    dref = 0.5 * (1 + erf(x64 / np.sqrt(2))) + x64 * np.exp(-x64 ** 2 / 2) / np.sqrt(2 * np.pi)
    dout = np.asarray(jax.jit(jax.vmap(jax.grad(layers.gelu)))(x))
    assert np.abs(dout - dref).max() <= 2e-6
    assert layers.gelu(jnp.ones(3, jnp.bfloat16)).dtype == jnp.bfloat16


def test_channel_hints():
    model = MCi(get_mci_config("MCI0"))  # names are case-insensitive
    with pytest.raises(ValueError, match="looks like NCHW"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 3, 64, 64)))
    with pytest.raises(ValueError, match="grayscale/RGBA"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 1)))


def test_bfloat16_compute_tracks_float32():
    """bf16 activations with f32 params: norms/softmax/pools stay f32, output close to f32."""
    cfg = get_mci_config("mci0")
    x = jax.random.uniform(jax.random.key(0), (2, 64, 64, 3))
    variables = jax.jit(MCi(cfg).init)(jax.random.key(1), x)
    ref = jax.jit(MCi(cfg).apply)(variables, x)
    out = jax.jit(MCi(cfg, dtype=jnp.bfloat16).apply)(variables, x)
    assert out.dtype == jnp.bfloat16
    err = float(jnp.abs(out.astype(jnp.float32) - ref).max() / jnp.abs(ref).max())
    assert err < 0.05
