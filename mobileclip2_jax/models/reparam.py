"""Train form → inference form: pure functions that fold reparameterizable branches.

``reparameterize(variables)`` walks a train-form variables tree (``{"params", "batch_stats"}``)
and replaces every MobileOne block, RepMixer, RepCPE and large-kernel conv by the single conv
with bias that timm's ``reparameterize_model`` produces (``shared/docs/architecture.md`` §4),
leaving everything the reference leaves alone (ConvMlp's conv+BN, attention norms, layer
scales of blocks, SE, heads). Modules are recognised by their parameter names, which mirror
timm's, so the function needs no model object and works for any tower built from these blocks.
The folds use timm's operation order in float32, so the result matches timm's own
reparameterized weights to float rounding.

Kernel layout is HWIO ``(kh, kw, in/groups, out)``.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import jax.numpy as jnp

Tree = Dict[str, Any]
BN_EPS = 1e-5


def fuse_bn(kernel: Optional[jnp.ndarray], bn_params: Mapping, bn_stats: Mapping,
            eps: float = BN_EPS) -> Tuple[jnp.ndarray, jnp.ndarray]:
    """Folds ``BN(conv(x))`` into one kernel and bias (timm ``_fuse_bn_tensor``)."""
    std = jnp.sqrt(bn_stats["var"] + eps)
    t = bn_params["scale"] / std
    bias = bn_params["bias"] - bn_stats["mean"] * bn_params["scale"] / std
    return kernel * t, bias


def identity_kernel(channels: int, in_per_group: int, kh: int, kw: int,
                    dtype=jnp.float32) -> jnp.ndarray:
    """HWIO kernel of the identity map for a conv with ``channels`` in=out and given groups."""
    k = jnp.zeros((kh, kw, in_per_group, channels), dtype)
    c = jnp.arange(channels)
    return k.at[kh // 2, kw // 2, c % in_per_group, c].set(1.0)


def _pad_kernel(kernel: jnp.ndarray, kh: int, kw: int) -> jnp.ndarray:
    ph, pw = (kh - kernel.shape[0]) // 2, (kw - kernel.shape[1]) // 2
    return jnp.pad(kernel, ((ph, ph), (pw, pw), (0, 0), (0, 0)))


def _kxk_names(params: Mapping) -> list:
    return sorted((k for k in params if k.startswith("conv_kxk_")), key=lambda k: int(k[9:]))


def fold_mobileone(params: Mapping, stats: Mapping,
                   kernel_shape: Optional[Tuple[int, int, int]] = None) -> Tuple[jnp.ndarray, jnp.ndarray]:
    """Kernel and bias of a train-form MobileOne block (timm ``_get_kernel_bias``).

    ``kernel_shape = (kh, kw, in_per_group)`` is needed only for a block that has no conv
    branch (RepMixer's identity-only ``norm``); otherwise it is read off ``conv_kxk_0``.
    """
    kxk = _kxk_names(params)
    if kxk:
        kh, kw, in_pg, _ = params[kxk[0]]["conv"]["kernel"].shape
    elif kernel_shape is not None:
        kh, kw, in_pg = kernel_shape
    else:
        raise ValueError("MobileOne block without conv branches needs kernel_shape")
    kernel, bias = 0.0, 0.0
    if "conv_scale" in params:
        k_s, b_s = fuse_bn(params["conv_scale"]["conv"]["kernel"], params["conv_scale"]["bn"],
                           stats["conv_scale"]["bn"])
        kernel_scale, bias_scale = _pad_kernel(k_s, kh, kw), b_s
    else:
        kernel_scale, bias_scale = 0.0, 0.0
    if "identity" in params:
        c = params["identity"]["scale"].shape[0]
        kernel_id, bias_id = fuse_bn(identity_kernel(c, in_pg, kh, kw), params["identity"],
                                     stats["identity"])
    else:
        kernel_id, bias_id = 0.0, 0.0
    kernel_conv, bias_conv = 0.0, 0.0
    for name in kxk:
        k_c, b_c = fuse_bn(params[name]["conv"]["kernel"], params[name]["bn"], stats[name]["bn"])
        kernel_conv, bias_conv = kernel_conv + k_c, bias_conv + b_c
    kernel = kernel_conv + kernel_scale + kernel_id
    bias = bias_conv + bias_scale + bias_id
    return kernel, bias


def fold_large_kernel(params: Mapping, stats: Mapping) -> Tuple[jnp.ndarray, jnp.ndarray]:
    """timm ``ReparamLargeKernelConv.get_kernel_bias``: BN(conv7) + pad(BN(conv3))."""
    k, b = fuse_bn(params["large_conv"]["conv"]["kernel"], params["large_conv"]["bn"],
                   stats["large_conv"]["bn"])
    if "small_conv" in params:
        k_s, b_s = fuse_bn(params["small_conv"]["conv"]["kernel"], params["small_conv"]["bn"],
                           stats["small_conv"]["bn"])
        b = b + b_s
        k = k + _pad_kernel(k_s, k.shape[0], k.shape[1])
    return k, b


def fold_repmixer(params: Mapping, stats: Mapping) -> Tuple[jnp.ndarray, jnp.ndarray]:
    """timm ``RepMixer.reparameterize``: ``I + ls·(W_mixer − W_norm)``, ``ls·(b_mixer − b_norm)``."""
    k_mix, b_mix = fold_mobileone(params["mixer"], stats["mixer"])
    kh, kw, in_pg, c = k_mix.shape
    k_norm, b_norm = fold_mobileone(params["norm"], stats["norm"], (kh, kw, in_pg))
    gamma = params["layer_scale"]
    kernel = identity_kernel(c, in_pg, kh, kw) + gamma * (k_mix - k_norm)
    bias = gamma * (b_mix - b_norm)
    return kernel, bias


def fold_rep_cpe(params: Mapping) -> Tuple[jnp.ndarray, jnp.ndarray]:
    """timm ``RepConditionalPosEnc.reparameterize``: ``W_pe + I``, ``b_pe``."""
    k = params["pos_enc"]["kernel"]
    kh, kw, in_pg, c = k.shape
    return identity_kernel(c, in_pg, kh, kw) + k, params["pos_enc"]["bias"]


def _kind(params: Mapping) -> Optional[str]:
    if "mixer" in params and "norm" in params and "layer_scale" in params:
        return "repmixer"
    if "large_conv" in params:
        return "large_kernel"
    if "pos_enc" in params:
        return "rep_cpe"
    if "identity" in params or "conv_scale" in params or "conv_kxk_0" in params:
        return "mobileone"
    return None


_CONSUMED = {
    "repmixer": ("mixer", "norm", "layer_scale"),
    "large_kernel": ("large_conv", "small_conv"),
    "rep_cpe": ("pos_enc",),
}


def _fold_tree(params: Mapping, stats: Mapping) -> Tuple[Tree, Tree]:
    kind = _kind(params)
    if kind is not None:
        if kind == "repmixer":
            kernel, bias = fold_repmixer(params, stats)
            consumed = _CONSUMED[kind]
        elif kind == "large_kernel":
            kernel, bias = fold_large_kernel(params, stats)
            consumed = _CONSUMED[kind]
        elif kind == "rep_cpe":
            kernel, bias = fold_rep_cpe(params)
            consumed = _CONSUMED[kind]
        else:
            kernel, bias = fold_mobileone(params, stats)
            consumed = tuple(_kxk_names(params)) + ("conv_scale", "identity")
        new_params = {k: v for k, v in params.items() if k not in consumed}
        new_params["reparam_conv"] = {"kernel": kernel, "bias": bias}
        # Children left in place (SE) hold nothing to fold and no batch stats.
        new_stats = {k: v for k, v in stats.items() if k not in consumed}
        return new_params, new_stats
    new_params = {}
    new_stats = {k: v for k, v in stats.items() if not isinstance(v, Mapping)}
    for k, v in params.items():
        if isinstance(v, Mapping):
            new_params[k], sub = _fold_tree(v, stats.get(k, {}))
            if sub:
                new_stats[k] = sub
        else:
            new_params[k] = v
    return new_params, new_stats


def reparameterize(variables: Mapping) -> Tree:
    """Returns inference-form variables for a train-form variables tree.

    ``variables`` is ``{"params": ..., "batch_stats": ...}`` of a train-form tower (any module
    built from MobileOne/RepMixer/RepCPE/large-kernel blocks). The result loads into the same
    module constructed with ``inference_mode=True``. Pure: inputs are not modified, so it can
    run under ``jax.jit``.
    """
    if "params" not in variables:
        raise ValueError(f"reparameterize expects {{'params', 'batch_stats'}}, got keys "
                         f"{sorted(variables)}")
    params, stats = _fold_tree(variables["params"], variables.get("batch_stats", {}))
    out = {k: v for k, v in variables.items() if k not in ("params", "batch_stats")}
    out["params"] = params
    if stats:
        out["batch_stats"] = stats
    return out
