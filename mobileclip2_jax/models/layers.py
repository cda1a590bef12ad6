"""Primitive layers shared by the image and text towers, written to match PyTorch exactly.

Every choice here that differs from a Flax default is a parity trap from
``shared/docs/architecture.md`` §8:
- convolutions pad symmetrically, ``((stride - 1) + (k - 1)) // 2`` per side, like timm's
  ``get_padding``; XLA's ``"SAME"`` pads (0, 1) on even inputs with stride 2 and is never used;
- GELU is the exact erf form (``jax.nn.gelu`` defaults to the tanh approximation);
- BatchNorm follows ``torch.nn.BatchNorm2d``: eps 1e-5, momentum 0.1, biased variance to
  normalize in train mode, *unbiased* variance folded into the running estimate;
- LayerNorm uses the two-pass variance (``use_fast_variance=False``) and an explicit eps.
Images are NHWC; kernels HWIO. Parameters stay float32; ``dtype`` is the compute dtype.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Tuple, Union

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax

from mobileclip2_jax.models.depthwise import depthwise_conv2d, im2col_conv2d, resolve_impl

Dtype = Any
IntPair = Union[int, Tuple[int, int]]

# PyTorch's default Conv2d/Linear init (kaiming_uniform with a=sqrt(5)) is U(±1/sqrt(fan_in)).
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
trunc_normal_02 = nn.initializers.truncated_normal(stddev=0.02)


# Rational minimax approximation of erf on [-4, 4] for float32 (Eigen's
# ``generic_fast_erf_float``): |error| <= 3.4e-7 against float64 erf, the same accuracy class as
# ``lax.erf`` (3.1e-7), but only FMAs and one division, which XLA:CPU vectorizes. ``lax.erf``
# runs ~3x slower there, and exact GELU is ~15% of an MCi forward pass on CPU.
_ERF_NUM = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06,
            -5.69250639462346e-05, -7.34990630326855e-04, -2.95459980854025e-03,
            -1.60960333262415e-02)
_ERF_DEN = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03,
            -7.37332916720468e-03, -1.42647390514189e-02)
_INV_SQRT2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


def erf_f32(x: jax.Array) -> jax.Array:
    """erf for float32/bfloat16 inputs (computed in float32), max abs error 3.4e-7."""
    xf = jnp.clip(x.astype(jnp.float32), -4.0, 4.0)
    x2 = xf * xf
    p = jnp.float32(_ERF_NUM[0])
    for c in _ERF_NUM[1:]:
        p = p * x2 + jnp.float32(c)
    q = jnp.float32(_ERF_DEN[0])
    for c in _ERF_DEN[1:]:
        q = q * x2 + jnp.float32(c)
    return xf * p / q


@jax.custom_jvp
def _gelu_erf_f32(x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    return (0.5 * xf * (1.0 + erf_f32(xf * _INV_SQRT2))).astype(x.dtype)


@_gelu_erf_f32.defjvp
def _gelu_erf_f32_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    xf = x.astype(jnp.float32)
    cdf = 0.5 * (1.0 + erf_f32(xf * _INV_SQRT2))
    pdf = jnp.exp(-0.5 * xf * xf) * _INV_SQRT_2PI
    return (xf * cdf).astype(x.dtype), (t.astype(jnp.float32) * (cdf + xf * pdf)).astype(t.dtype)


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, as ``torch.nn.GELU()`` — never the tanh approximation.

    float32/bfloat16 use :func:`erf_f32` with the analytic derivative
    ``Φ(x) + x·φ(x)``; float64 uses ``lax.erf``.
    """
    if x.dtype == jnp.float64:
        return jax.nn.gelu(x, approximate=False)
    return _gelu_erf_f32(x)


def _pair(v: IntPair) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def torch_padding(kernel_size: IntPair, stride: IntPair = 1) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """Symmetric padding of timm ``get_padding``: ``((s - 1) + (k - 1)) // 2`` on each side."""
    (kh, kw), (sh, sw) = _pair(kernel_size), _pair(stride)
    ph, pw = ((sh - 1) + (kh - 1)) // 2, ((sw - 1) + (kw - 1)) // 2
    return ((ph, ph), (pw, pw))


def _bias_init_for(fan_in: int) -> Callable:
    bound = 1.0 / max(fan_in, 1) ** 0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


# Dense convs whose patch (kh·kw·C_in) is at most this many values run as im2col + matmul on the
# CPU path (the RGB stem conv: 27); larger ones go to XLA's convolution.
IM2COL_MAX_PATCH = 128


class Conv2d(nn.Module):
    """2-D convolution with PyTorch semantics (symmetric explicit padding, ``groups``).

    Kernel layout HWIO ``(kh, kw, in/groups, out)``. Depthwise convs (``groups == in``,
    including channel multipliers ``out = m * in``) go through :func:`depthwise_conv2d`,
    which is fast on CPU; dense 1×1 convs are a (strided) matmul, and on the CPU path dense
    convs with a small patch (the RGB stem) use im2col.
    """
    features: int
    kernel_size: IntPair
    stride: IntPair = 1
    groups: int = 1
    use_bias: bool = False
    padding: Optional[Tuple[Tuple[int, int], Tuple[int, int]]] = None
    kernel_init: Callable = torch_default_kernel_init
    bias_init: Optional[Callable] = None
    depthwise_impl: str = "auto"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_ch = x.shape[-1]
        if in_ch % self.groups or self.features % self.groups:
            raise ValueError(f"{self.name}: channels in={in_ch} out={self.features} not divisible "
                             f"by groups={self.groups}")
        kh, kw = _pair(self.kernel_size)
        stride = _pair(self.stride)
        pad = self.padding if self.padding is not None else torch_padding((kh, kw), stride)
        kernel = self.param("kernel", self.kernel_init, (kh, kw, in_ch // self.groups, self.features))
        kernel = kernel.astype(self.dtype)
        x = x.astype(self.dtype)
        if self.groups == in_ch and self.groups > 1:
            y = depthwise_conv2d(x, kernel, stride, pad, impl=self.depthwise_impl)
        elif self.groups == 1 and (kh, kw) == (1, 1) and pad == ((0, 0), (0, 0)):
            y = jnp.einsum("bhwc,cd->bhwd", x[:, ::stride[0], ::stride[1]], kernel[0, 0])
        elif (self.groups == 1 and kh * kw * in_ch <= IM2COL_MAX_PATCH
              and resolve_impl(self.depthwise_impl) == "shift_add"):
            y = im2col_conv2d(x, kernel, stride, pad)
        else:
            y = lax.conv_general_dilated(
                x, kernel, window_strides=stride, padding=pad,
                dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=self.groups)
        if self.use_bias:
            fan_in = kh * kw * in_ch // self.groups
            bias = self.param("bias", self.bias_init or _bias_init_for(fan_in), (self.features,))
            y = y + bias.astype(self.dtype)
        return y


class Dense(nn.Module):
    """Linear layer; kernel ``(in, out)`` = PyTorch ``weight.T``."""
    features: int
    use_bias: bool = True
    kernel_init: Callable = trunc_normal_02
    bias_init: Callable = nn.initializers.zeros
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (self.features,)).astype(self.dtype)
        return y


class BatchNorm(nn.Module):
    """``torch.nn.BatchNorm2d`` over the last (channel) axis.

    Params ``scale``/``bias`` (torch ``weight``/``bias``); batch stats ``mean``/``var``
    (torch ``running_mean``/``running_var``). In train mode it normalizes with the biased batch
    variance and updates ``var`` with the unbiased one, exactly like PyTorch; under ``jax.jit``
    with a batch sharded over devices the statistics are global (sync-BN). Statistics and the
    normalization are computed in float32 whatever the activation dtype.
    """
    epsilon: float = 1e-5
    momentum: float = 0.1  # PyTorch convention: new = (1 - m) * old + m * batch

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        if train:
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(xf, axis=axes)
            var = jnp.mean(jnp.square(xf - mean), axis=axes)
            if not self.is_initializing():
                n = xf.size // c
                unbiased = var * (n / max(n - 1, 1))
                ra_mean.value = ((1 - self.momentum) * ra_mean.value
                                 + self.momentum * mean).astype(ra_mean.value.dtype)
                ra_var.value = ((1 - self.momentum) * ra_var.value
                                + self.momentum * unbiased).astype(ra_var.value.dtype)
        else:
            mean, var = ra_mean.value, ra_var.value
        y = (xf - mean) * lax.rsqrt(var + self.epsilon) * scale + bias
        return y.astype(x.dtype)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis with PyTorch numerics (two-pass variance, explicit eps).

    On NHWC feature maps this is timm's ``LayerNorm2d`` (normalize over channels).
    """
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * lax.rsqrt(var + self.epsilon) * scale + bias
        return y.astype(x.dtype)


class ConvNorm(nn.Module):
    """Conv (no bias) followed by BatchNorm: timm ``ConvNormAct(apply_act=False)``."""
    features: int
    kernel_size: IntPair
    stride: IntPair = 1
    groups: int = 1
    kernel_init: Callable = torch_default_kernel_init
    depthwise_impl: str = "auto"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = Conv2d(self.features, self.kernel_size, self.stride, self.groups, use_bias=False,
                   kernel_init=self.kernel_init, depthwise_impl=self.depthwise_impl,
                   dtype=self.dtype, name="conv")(x)
        return BatchNorm(name="bn")(x, train)


def make_divisible(v: float, divisor: int = 8, min_value: Optional[int] = None,
                   round_limit: float = 0.9) -> int:
    """timm ``make_divisible`` (channel rounding used to size SE bottlenecks)."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


class SqueezeExcite(nn.Module):
    """timm ``SEModule``: ``x * sigmoid(fc2(relu(fc1(mean_hw(x)))))`` with 1×1-conv fcs.

    The fcs are stored as :class:`Dense` (the input is a pooled vector); the converter maps
    the PyTorch ``[out, in, 1, 1]`` conv weights.
    """
    rd_ratio: float = 1.0 / 16
    rd_divisor: int = 8
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        rd = make_divisible(c * self.rd_ratio, self.rd_divisor, round_limit=0.0)
        s = jnp.mean(x.astype(jnp.promote_types(x.dtype, jnp.float32)), axis=(1, 2)).astype(self.dtype)
        s = Dense(rd, kernel_init=torch_default_kernel_init, bias_init=_bias_init_for(c),
                  dtype=self.dtype, name="fc1")(s)
        s = jax.nn.relu(s)
        s = Dense(c, kernel_init=torch_default_kernel_init, bias_init=_bias_init_for(rd),
                  dtype=self.dtype, name="fc2")(s)
        return x * jax.nn.sigmoid(s)[:, None, None, :].astype(x.dtype)


class DropPath(nn.Module):
    """Stochastic depth per sample (timm ``DropPath``); identity at eval or rate 0."""
    rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if not train or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(mask, x / keep, jnp.zeros_like(x))


def layer_scale_param(module: nn.Module, name: str, dim: int, init_value: float) -> jax.Array:
    """timm ``LayerScale2d.gamma`` ``[C,1,1]`` stored as ``[C]`` (channels-last broadcast)."""
    return module.param(name, nn.initializers.constant(init_value), (dim,))
