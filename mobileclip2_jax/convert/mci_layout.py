"""Explicit key tables for the MCi towers (timm ``fastvit_mci*`` / open_clip ``visual.trunk``).

One function per module type returns the rows for that module, given its Flax path and its
PyTorch key prefix; :func:`mci_key_table` walks the architecture from the same
:class:`~mobileclip2_jax.models.mci.MCiConfig` the Flax modules are built from. Branch
presence follows timm's rules (identity BN iff in == out and stride 1; 1×1 scale branch iff
k > 1 and the block uses it).
"""
from __future__ import annotations

import functools
from typing import Any, Dict, List, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from mobileclip2_jax.convert.torch_layout import (KeyEntry, batchnorm_keys, conv_keys, detect_prefix,
                                                  layernorm_keys, linear_keys, normalize_state_dict,
                                                  state_dict_to_variables, variables_to_state_dict)
from mobileclip2_jax.models.mci import MCi, MCiConfig, get_mci_config

Path = Tuple[str, ...]
OPEN_CLIP_PREFIX = "visual.trunk."


def conv_norm_keys(fp: Path, tp: str) -> List[KeyEntry]:
    """timm ``ConvNormAct``: ``conv.weight`` + ``bn.*``."""
    return conv_keys(fp + ("conv",), f"{tp}.conv", False) + batchnorm_keys(fp + ("bn",), f"{tp}.bn")


def squeeze_excite_keys(fp: Path, tp: str) -> List[KeyEntry]:
    return (linear_keys(fp + ("fc1",), f"{tp}.fc1", transform="conv1x1_linear")
            + linear_keys(fp + ("fc2",), f"{tp}.fc2", transform="conv1x1_linear"))


def layer_scale_keys(fp: Path, tp: str) -> List[KeyEntry]:
    return [KeyEntry("params", fp, f"{tp}.gamma", "layer_scale")]


def mobileone_keys(fp: Path, tp: str, *, in_ch: int, out_ch: int, kernel: int, stride: int,
                   inference: bool, use_se: bool = False, use_scale_branch: bool = True,
                   num_conv_branches: int = 1) -> List[KeyEntry]:
    rows = squeeze_excite_keys(fp + ("se",), f"{tp}.se") if use_se else []
    if inference:
        return rows + conv_keys(fp + ("reparam_conv",), f"{tp}.reparam_conv", True)
    if in_ch == out_ch and stride == 1:
        rows += batchnorm_keys(fp + ("identity",), f"{tp}.identity")
    for i in range(num_conv_branches):
        rows += conv_norm_keys(fp + (f"conv_kxk_{i}",), f"{tp}.conv_kxk.{i}")
    if kernel > 1 and use_scale_branch:
        rows += conv_norm_keys(fp + ("conv_scale",), f"{tp}.conv_scale")
    return rows


def large_kernel_keys(fp: Path, tp: str, *, use_se: bool, inference: bool) -> List[KeyEntry]:
    if inference:
        rows = conv_keys(fp + ("reparam_conv",), f"{tp}.reparam_conv", True)
    else:
        rows = (conv_norm_keys(fp + ("large_conv",), f"{tp}.large_conv")
                + conv_norm_keys(fp + ("small_conv",), f"{tp}.small_conv"))
    if use_se:
        rows += squeeze_excite_keys(fp + ("se",), f"{tp}.se")
    return rows


def repmixer_keys(fp: Path, tp: str, *, dim: int, kernel: int, inference: bool) -> List[KeyEntry]:
    if inference:
        return conv_keys(fp + ("reparam_conv",), f"{tp}.reparam_conv", True)
    kw = dict(in_ch=dim, out_ch=dim, kernel=kernel, stride=1, inference=False)
    return (mobileone_keys(fp + ("norm",), f"{tp}.norm", use_scale_branch=False,
                           num_conv_branches=0, **kw)
            + mobileone_keys(fp + ("mixer",), f"{tp}.mixer", **kw)
            + layer_scale_keys(fp + ("layer_scale",), f"{tp}.layer_scale"))


def conv_mlp_keys(fp: Path, tp: str) -> List[KeyEntry]:
    return (conv_norm_keys(fp + ("conv",), f"{tp}.conv")
            + conv_keys(fp + ("fc1",), f"{tp}.fc1", True)
            + conv_keys(fp + ("fc2",), f"{tp}.fc2", True))


def repmixer_block_keys(fp: Path, tp: str, *, dim: int, kernel: int, inference: bool) -> List[KeyEntry]:
    return (repmixer_keys(fp + ("token_mixer",), f"{tp}.token_mixer", dim=dim, kernel=kernel,
                          inference=inference)
            + conv_mlp_keys(fp + ("mlp",), f"{tp}.mlp")
            + layer_scale_keys(fp + ("layer_scale",), f"{tp}.layer_scale"))


def attention_block_keys(fp: Path, tp: str, *, norm: str) -> List[KeyEntry]:
    norm_rows = (batchnorm_keys if norm == "batchnorm" else layernorm_keys)(fp + ("norm",), f"{tp}.norm")
    return (norm_rows
            + linear_keys(fp + ("token_mixer", "qkv"), f"{tp}.token_mixer.qkv", bias=False)
            + linear_keys(fp + ("token_mixer", "proj"), f"{tp}.token_mixer.proj")
            + layer_scale_keys(fp + ("layer_scale_1",), f"{tp}.layer_scale_1")
            + conv_mlp_keys(fp + ("mlp",), f"{tp}.mlp")
            + layer_scale_keys(fp + ("layer_scale_2",), f"{tp}.layer_scale_2"))


def rep_cpe_keys(fp: Path, tp: str, *, inference: bool) -> List[KeyEntry]:
    name = "reparam_conv" if inference else "pos_enc"
    return conv_keys(fp + (name,), f"{tp}.{name}", True)


def mci_key_table(cfg: MCiConfig, inference: bool = False) -> List[KeyEntry]:
    """Every tensor of an MCi tower: Flax path ↔ timm key (no prefix) ↔ transform."""
    rows: List[KeyEntry] = []
    c0, sb = cfg.embed_dims[0], cfg.stem_use_scale_branch
    for i, (cin, k, s) in enumerate([(3, 3, 2), (c0, 3, 2), (c0, 1, 1)]):
        rows += mobileone_keys((f"stem_{i}",), f"stem.{i}", in_ch=cin, out_ch=c0, kernel=k, stride=s,
                               inference=inference, use_scale_branch=sb)
    prev = c0
    for i, dim in enumerate(cfg.embed_dims):
        fp, tp = (f"stages_{i}",), f"stages.{i}"
        if cfg.downsamples()[i]:
            rows += large_kernel_keys(fp + ("downsample", "proj_0"), f"{tp}.downsample.proj.0",
                                      use_se=cfg.se_downsamples[i], inference=inference)
            rows += mobileone_keys(fp + ("downsample", "proj_1"), f"{tp}.downsample.proj.1",
                                   in_ch=dim, out_ch=dim, kernel=1, stride=1, inference=inference)
        if cfg.pos_embs[i]:
            rows += rep_cpe_keys(fp + ("pos_emb",), f"{tp}.pos_emb", inference=inference)
        for j in range(cfg.layers[i]):
            bfp, btp = fp + (f"blocks_{j}",), f"{tp}.blocks.{j}"
            if cfg.token_mixers[i] == "repmixer":
                rows += repmixer_block_keys(bfp, btp, dim=dim, kernel=cfg.repmixer_kernel_size,
                                            inference=inference)
            else:
                rows += attention_block_keys(bfp, btp, norm=cfg.attn_norm)
        prev = dim
    final = int(prev * cfg.cls_ratio)
    rows += mobileone_keys(("final_conv",), "final_conv", in_ch=prev, out_ch=final, kernel=3, stride=1,
                           inference=inference, use_se=True)
    rows += linear_keys(("head_fc",), "head.fc")
    return rows


@functools.lru_cache(maxsize=16)
def mci_abstract_variables(cfg: MCiConfig, inference: bool = False) -> Dict[str, Any]:
    """Shapes of the Flax variables of an MCi tower, without allocating them (cached)."""
    size = cfg.total_stride
    return jax.eval_shape(MCi(cfg, inference_mode=inference).init, jax.random.key(0),
                          jnp.zeros((1, size, size, 3), jnp.float32))


def _resolve(cfg_or_name) -> MCiConfig:
    return get_mci_config(cfg_or_name) if isinstance(cfg_or_name, str) else cfg_or_name


def mci_from_torch(state_dict: Mapping[str, Any], cfg, inference: Optional[bool] = None,
                   prefix: Optional[str] = None) -> Dict[str, Any]:
    """timm ``fastvit_mci*`` or open_clip MobileCLIP state_dict → Flax variables of :class:`MCi`.

    ``prefix=None`` auto-detects open_clip's ``visual.trunk.`` (and plain timm keys);
    ``inference=None`` detects a reparameterized state_dict by its ``reparam_conv`` keys.
    Raises :class:`~mobileclip2_jax.convert.torch_layout.StateDictMismatchError` listing
    missing, unexpected and mis-shaped keys.
    """
    cfg = _resolve(cfg)
    sd = normalize_state_dict(state_dict)
    if prefix is None:
        prefix = detect_prefix(sd, [OPEN_CLIP_PREFIX, "trunk."], "stem.0.")
    if inference is None:
        inference = any(k.startswith(prefix + "stem.0.reparam_conv") for k in sd)
    form = "inference" if inference else "train"
    return state_dict_to_variables(sd, mci_key_table(cfg, inference), mci_abstract_variables(cfg, inference),
                                   prefix=prefix, what=f"{cfg.name} ({form} form)")


def mci_to_torch(variables: Mapping[str, Any], cfg, inference: bool = False,
                 prefix: str = "") -> Dict[str, np.ndarray]:
    """Flax variables of :class:`MCi` → timm state_dict (numpy); ``prefix="visual.trunk."`` for
    open_clip."""
    cfg = _resolve(cfg)
    variables = jax.tree.map(np.asarray, dict(variables))
    form = "inference" if inference else "train"
    return variables_to_state_dict(variables, mci_key_table(cfg, inference), prefix=prefix,
                                   what=f"{cfg.name} ({form} form)")
