"""Explicit key table for the base text tower (open_clip ``text.*`` of ``CustomTextCLIP``)."""
from __future__ import annotations

import functools
from typing import Any, Dict, List, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from mobileclip2_jax.convert.torch_layout import (KeyEntry, detect_prefix, layernorm_keys, linear_keys,
                                                  normalize_state_dict,
                                                  state_dict_to_variables, variables_to_state_dict)
from mobileclip2_jax.models.text import TextConfig, TextTransformer

OPEN_CLIP_PREFIX = "text."


def resblock_keys(fp, tp: str) -> List[KeyEntry]:
    """open_clip ``ResidualAttentionBlock`` (``nn.MultiheadAttention`` naming)."""
    return (layernorm_keys(fp + ("ln_1",), f"{tp}.ln_1")
            + [KeyEntry("params", fp + ("attn", "in_proj", "kernel"), f"{tp}.attn.in_proj_weight", "linear"),
               KeyEntry("params", fp + ("attn", "in_proj", "bias"), f"{tp}.attn.in_proj_bias", "vector")]
            + linear_keys(fp + ("attn", "out_proj"), f"{tp}.attn.out_proj")
            + layernorm_keys(fp + ("ln_2",), f"{tp}.ln_2")
            + linear_keys(fp + ("c_fc",), f"{tp}.mlp.c_fc")
            + linear_keys(fp + ("c_proj",), f"{tp}.mlp.c_proj"))


def text_key_table(cfg: TextConfig) -> List[KeyEntry]:
    rows = [KeyEntry("params", ("token_embedding",), "token_embedding.weight", "vector"),
            KeyEntry("params", ("positional_embedding",), "positional_embedding", "vector")]
    for i in range(cfg.layers):
        rows += resblock_keys((f"resblocks_{i}",), f"transformer.resblocks.{i}")
    rows += layernorm_keys(("ln_final",), "ln_final")
    rows.append(KeyEntry("params", ("text_projection",), "text_projection", "vector"))  # x @ P
    return rows


@functools.lru_cache(maxsize=8)
def text_abstract_variables(cfg: TextConfig) -> Dict[str, Any]:
    ids = jax.ShapeDtypeStruct((1, cfg.context_length), jnp.int32)
    return jax.eval_shape(TextTransformer(cfg).init, jax.random.key(0), ids)


def text_from_torch(state_dict: Mapping[str, Any], cfg: TextConfig,
                    prefix: Optional[str] = None) -> Dict[str, Any]:
    """open_clip text tower (``text.*`` of a CLIP dict, or the tower's own dict) → Flax variables."""
    sd = normalize_state_dict(state_dict)
    if prefix is None:
        prefix = detect_prefix(sd, [OPEN_CLIP_PREFIX], "token_embedding.weight")
    return state_dict_to_variables(sd, text_key_table(cfg), text_abstract_variables(cfg), prefix=prefix,
                                   what=f"text tower {cfg}")


def text_to_torch(variables: Mapping[str, Any], cfg: TextConfig, prefix: str = "") -> Dict[str, np.ndarray]:
    return variables_to_state_dict(jax.tree.map(np.asarray, dict(variables)), text_key_table(cfg),
                                   prefix=prefix, what=f"text tower {cfg}")
