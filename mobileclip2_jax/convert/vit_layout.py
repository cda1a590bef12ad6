"""Explicit key table for the ViT towers (timm ``vit_base_mci_224`` / ``vit_large_patch14_clip_224``,
open_clip ``visual.trunk.*``)."""
from __future__ import annotations

import functools
from typing import Any, Dict, List, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from mobileclip2_jax.convert.torch_layout import (KeyEntry, batchnorm_keys, conv_keys, detect_prefix,
                                                  layernorm_keys, linear_keys, normalize_state_dict,
                                                  state_dict_to_variables, variables_to_state_dict)
from mobileclip2_jax.models.vit import ViT, ViTConfig

OPEN_CLIP_PREFIX = "visual.trunk."


def vit_block_keys(fp, tp: str) -> List[KeyEntry]:
    return (layernorm_keys(fp + ("norm1",), f"{tp}.norm1")
            + linear_keys(fp + ("qkv",), f"{tp}.attn.qkv")
            + linear_keys(fp + ("proj",), f"{tp}.attn.proj")
            + layernorm_keys(fp + ("norm2",), f"{tp}.norm2")
            + linear_keys(fp + ("fc1",), f"{tp}.mlp.fc1")
            + linear_keys(fp + ("fc2",), f"{tp}.mlp.fc2"))


def vit_key_table(cfg: ViTConfig) -> List[KeyEntry]:
    if cfg.stem == "mci_conv":
        rows = (conv_keys(("stem_0",), "patch_embed.backbone.0.conv", False)
                + batchnorm_keys(("stem_0_bn",), "patch_embed.backbone.0.bn")
                + conv_keys(("stem_1",), "patch_embed.backbone.1.conv", False)
                + batchnorm_keys(("stem_1_bn",), "patch_embed.backbone.1.bn")
                + conv_keys(("stem_2",), "patch_embed.backbone.2.conv", True))
    else:
        rows = conv_keys(("patch_embed",), "patch_embed.proj", not cfg.pre_norm)
    rows += [KeyEntry("params", ("cls_token",), "cls_token", "vector"),
             KeyEntry("params", ("pos_embed",), "pos_embed", "vector")]
    if cfg.pre_norm:
        rows += layernorm_keys(("norm_pre",), "norm_pre")
    for i in range(cfg.depth):
        rows += vit_block_keys((f"blocks_{i}",), f"blocks.{i}")
    return rows + layernorm_keys(("norm",), "norm") + linear_keys(("head",), "head")


@functools.lru_cache(maxsize=8)
def vit_abstract_variables(cfg: ViTConfig) -> Dict[str, Any]:
    x = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, 3), jnp.float32)
    return jax.eval_shape(ViT(cfg).init, jax.random.key(0), x)


def vit_from_torch(state_dict: Mapping[str, Any], cfg: ViTConfig, prefix: Optional[str] = None) -> Dict[str, Any]:
    sd = normalize_state_dict(state_dict)
    if prefix is None:
        prefix = detect_prefix(sd, [OPEN_CLIP_PREFIX, "trunk."], "cls_token")
    return state_dict_to_variables(sd, vit_key_table(cfg), vit_abstract_variables(cfg), prefix=prefix,
                                   what=cfg.name)


def vit_to_torch(variables: Mapping[str, Any], cfg: ViTConfig, prefix: str = "") -> Dict[str, np.ndarray]:
    return variables_to_state_dict(jax.tree.map(np.asarray, dict(variables)), vit_key_table(cfg),
                                   prefix=prefix, what=cfg.name)
