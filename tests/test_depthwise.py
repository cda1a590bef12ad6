"""The CPU-fast depthwise conv equals XLA's grouped conv, forward and backward."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobileclip2_jax.models.depthwise import depthwise_conv2d, resolve_impl
from mobileclip2_jax.models.layers import torch_padding

CASES = [  # (kernel, stride, multiplier, spatial)
    (3, 1, 1, 16), (3, 2, 1, 15), (7, 1, 1, 12), (7, 2, 2, 16), (7, 2, 2, 17),
    (3, 2, 2, 9), (1, 1, 1, 8), (1, 2, 1, 8), (3, 1, 2, 8),
]


@pytest.mark.parametrize("k,stride,mult,size", CASES)
def test_shift_add_matches_xla_forward_and_grads(k, stride, mult, size):
    kx, kk, kg = jax.random.split(jax.random.key(k * 100 + stride * 10 + mult), 3)
    c = 6
    x = jax.random.normal(kx, (2, size, size + 1, c))
    w = jax.random.normal(kk, (k, k, 1, c * mult))
    pad = torch_padding(k, stride)

    def f(impl):
        return jax.jit(lambda x, w: depthwise_conv2d(x, w, (stride, stride), pad, impl=impl))

    ref = f("xla")(x, w)
    out = f("shift_add")(x, w)
    assert out.shape == ref.shape
    scale = float(jnp.abs(ref).max())
    np.testing.assert_allclose(out, ref, atol=1e-6 * scale, rtol=0)

    cot = jax.random.normal(kg, ref.shape)
    loss = lambda impl: (lambda x, w: jnp.sum(f(impl)(x, w) * cot))
    gx_ref, gw_ref = jax.jit(jax.grad(loss("xla"), argnums=(0, 1)))(x, w)
    gx, gw = jax.jit(jax.grad(loss("shift_add"), argnums=(0, 1)))(x, w)
    np.testing.assert_allclose(gx, gx_ref, atol=1e-6 * float(jnp.abs(gx_ref).max()), rtol=0)
    np.testing.assert_allclose(gw, gw_ref, atol=1e-6 * float(jnp.abs(gw_ref).max()), rtol=0)


def test_shift_add_bf16_accumulates_in_f32():
    x = jax.random.normal(jax.random.key(0), (1, 9, 9, 4))
    w = jax.random.normal(jax.random.key(1), (7, 7, 1, 4))
    pad = torch_padding(7, 1)
    ref = depthwise_conv2d(x, w, (1, 1), pad, impl="xla")
    out = depthwise_conv2d(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), (1, 1), pad,
                           impl="shift_add")
    assert out.dtype == jnp.bfloat16
    # bf16 inputs/weights round to 8 bits; an f32 accumulator keeps the sum within a few ulps.
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=0.05 * float(jnp.abs(ref).max()))


def test_impl_resolution(monkeypatch):
    monkeypatch.delenv("MOBILECLIP2_JAX_DEPTHWISE_IMPL", raising=False)
    assert resolve_impl("auto") == ("shift_add" if jax.default_backend() == "cpu" else "xla")
    assert resolve_impl("xla") == "xla"
    monkeypatch.setenv("MOBILECLIP2_JAX_DEPTHWISE_IMPL", "xla")
    assert resolve_impl("auto") == "xla"
    monkeypatch.setenv("MOBILECLIP2_JAX_DEPTHWISE_IMPL", "bogus")
    with pytest.raises(ValueError, match="MOBILECLIP2_JAX_DEPTHWISE_IMPL"):
        resolve_impl("auto")
    with pytest.raises(ValueError, match="depthwise impl"):
        resolve_impl("fast")


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="NHWC"):
        depthwise_conv2d(jnp.zeros((4, 4, 3)), jnp.zeros((3, 3, 1, 3)))
    with pytest.raises(ValueError, match="multiple"):
        depthwise_conv2d(jnp.zeros((1, 4, 4, 3)), jnp.zeros((3, 3, 1, 4)))


@pytest.mark.parametrize("k,stride,cin,size", [(3, 2, 3, 16), (3, 2, 3, 15), (3, 1, 5, 9), (5, 2, 2, 11)])
def test_im2col_matches_xla_conv(k, stride, cin, size):
    from mobileclip2_jax.models.depthwise import im2col_conv2d
    x = jax.random.normal(jax.random.key(k), (2, size, size + 2, cin))
    w = jax.random.normal(jax.random.key(cin), (k, k, cin, 7))
    pad = torch_padding(k, stride)
    ref = jax.lax.conv_general_dilated(x, w, (stride, stride), pad, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    out = jax.jit(im2col_conv2d, static_argnums=(2, 3))(x, w, (stride, stride), pad)
    np.testing.assert_allclose(out, ref, atol=1e-6 * float(jnp.abs(ref).max()), rtol=0)
