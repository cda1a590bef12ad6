"""Convolution kernels with CPU-fast paths: depthwise (shift-and-add) and small-patch dense (im2col).

XLA:CPU lowers ``feature_group_count == C`` convolutions to a generic loop that runs at
~0.6 GFLOP/s on this project's reference CPU (about 20x slower than PyTorch; see
``shared/docs/environment.md`` §4), and MCi towers are dominated by depthwise convs. The
"shift-and-add" form below writes a k×k depthwise conv as k² strided slices of the padded
input, each multiplied by one tap of the per-channel kernel. XLA fuses the whole sum into a
single elementwise loop, which is an order of magnitude faster on CPU. On TPU/GPU the native
``lax.conv_general_dilated`` is the fast path, so ``impl="auto"`` picks by backend.

Both paths compute the same function (forward and gradients agree to float rounding; see
``tests/test_depthwise.py``).
"""
from __future__ import annotations

import os
from typing import Sequence, Tuple

import jax
import jax.numpy as jnp
from jax import lax

Padding = Tuple[Tuple[int, int], Tuple[int, int]]

IMPLS = ("auto", "shift_add", "xla")
_ENV_VAR = "MOBILECLIP2_JAX_DEPTHWISE_IMPL"


def resolve_impl(impl: str = "auto") -> str:
    """Returns the concrete implementation ("shift_add" or "xla") for ``impl``.

    ``"auto"`` honours the environment variable ``MOBILECLIP2_JAX_DEPTHWISE_IMPL`` if set,
    else picks ``"shift_add"`` on the CPU backend and ``"xla"`` elsewhere.
    """
    if impl not in IMPLS:
        raise ValueError(f"depthwise impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = os.environ.get(_ENV_VAR, "auto")
        if impl not in IMPLS:
            raise ValueError(f"${_ENV_VAR} must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = "shift_add" if jax.default_backend() == "cpu" else "xla"
    return impl


def _check(x: jax.Array, kernel: jax.Array) -> int:
    if x.ndim != 4:
        raise ValueError(f"depthwise_conv2d expects NHWC input (B, H, W, C), got shape {x.shape}")
    if kernel.ndim != 4 or kernel.shape[2] != 1:
        raise ValueError(
            f"depthwise_conv2d expects an HWIO kernel (kh, kw, 1, C*multiplier), got {kernel.shape}")
    channels = x.shape[-1]
    if kernel.shape[3] % channels:
        raise ValueError(
            f"kernel output channels {kernel.shape[3]} are not a multiple of input channels {channels}")
    return kernel.shape[3] // channels


def depthwise_conv2d(
    x: jax.Array,
    kernel: jax.Array,
    stride: Sequence[int] = (1, 1),
    padding: Padding = ((0, 0), (0, 0)),
    impl: str = "auto",
) -> jax.Array:
    """Depthwise conv, NHWC input, HWIO kernel ``(kh, kw, 1, C*m)`` (PyTorch ``groups=C``).

    Output channel ``o`` reads input channel ``o // m``, as in PyTorch's grouped conv with
    ``out_channels = m * in_channels`` (MCi downsample and final convs use ``m = 2``).
    ``padding`` is explicit ``((top, bottom), (left, right))``: ports from PyTorch must never
    use ``"SAME"`` (asymmetric on even inputs with stride 2).
    """
    multiplier = _check(x, kernel)
    stride = tuple(stride)
    impl = resolve_impl(impl)
    if impl == "xla":
        return lax.conv_general_dilated(
            x, kernel.astype(x.dtype), window_strides=stride, padding=padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1])
    return _shift_add(x, kernel, stride, padding, multiplier)


def _shift_add(x, kernel, stride, padding, multiplier):
    if multiplier > 1:
        # Channel order c0,c0,c1,c1,...: output o reads input o // m, as in PyTorch.
        x = jnp.repeat(x, multiplier, axis=-1)
    kh, kw = kernel.shape[:2]
    sh, sw = stride
    xp = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
    # Materialize the stencil input. Without the barrier XLA may fuse the producer of ``x``
    # (often another depthwise stencil) into each of the k² slices and recompute it k² times:
    # a RepMixer 3×3 feeding a ConvMlp 7×7 then costs 441 instead of 58 MACs per element.
    xp = lax.optimization_barrier(xp)
    batch, hp, wp, channels = xp.shape
    ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
    if ho < 1 or wo < 1:
        raise ValueError(
            f"depthwise_conv2d: input {x.shape[1:3]} with padding {padding} is smaller than the "
            f"kernel {(kh, kw)}")
    # Accumulate in at least float32 so bf16 activations do not lose the k² partial sums.
    acc_dtype = jnp.promote_types(x.dtype, jnp.float32)
    w = kernel[:, :, 0, :].astype(acc_dtype)
    out = None
    for i in range(kh):
        for j in range(kw):
            window = lax.slice(
                xp, (0, i, j, 0), (batch, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, channels),
                (1, sh, sw, 1))
            term = window.astype(acc_dtype) * w[i, j]
            out = term if out is None else out + term
    return out.astype(x.dtype)


def im2col_conv2d(
    x: jax.Array,
    kernel: jax.Array,
    stride: Sequence[int] = (1, 1),
    padding: Padding = ((0, 0), (0, 0)),
) -> jax.Array:
    """Dense (``groups=1``) conv as patch extraction + one matmul.

    For convs with few input channels (the MCi stem's 3×3 stride-2 conv on RGB has a patch of
    only 27 values) XLA:CPU's convolution runs ~2.5× slower than building the ``(B, H', W',
    kh·kw·C)`` patch tensor from k² strided slices and multiplying it by the reshaped kernel.
    Patch order is (kh, kw, C), matching the HWIO kernel's row-major reshape.
    """
    kh, kw, cin, cout = kernel.shape
    if x.ndim != 4 or x.shape[-1] != cin:
        raise ValueError(f"im2col_conv2d: input {x.shape} does not match kernel {kernel.shape}")
    sh, sw = tuple(stride)
    xp = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
    batch, hp, wp, _ = xp.shape
    ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
    cols = [lax.slice(xp, (0, i, j, 0), (batch, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, cin),
                      (1, sh, sw, 1))
            for i in range(kh) for j in range(kw)]
    patches = cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)
    return jnp.einsum("bhwk,kd->bhwd", patches, kernel.reshape(kh * kw * cin, cout).astype(x.dtype))
