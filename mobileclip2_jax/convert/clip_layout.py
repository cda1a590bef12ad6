"""Whole-model key table: open_clip ``CustomTextCLIP`` state_dict ↔ Flax :class:`CLIP` variables.

open_clip stores a MobileCLIP as ``visual.trunk.*`` (the timm image tower, whose ``head`` is
the image projection), ``text.*`` (the text tower) and ``logit_scale`` (``architecture.md``
§5.1). The table here re-roots the per-tower tables (``mci_layout``, ``vit_layout``,
``text_layout``) under the CLIP module's ``visual`` / ``text`` scopes, so one strict pass
checks the whole checkpoint: a key of the wrong variant, a missing tower or a stray key all
fail with one error naming them.

Apple-package checkpoints (MobileCLIP-S0, -B v1) have their own layout in ``apple_layout``.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Dict, List, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from mobileclip2_jax.convert.mci_layout import mci_key_table
from mobileclip2_jax.convert.text_layout import text_key_table
from mobileclip2_jax.convert.torch_layout import (KeyEntry, normalize_state_dict, state_dict_to_variables,
                                                  variables_to_state_dict)
from mobileclip2_jax.convert.vit_layout import vit_key_table
from mobileclip2_jax.models.clip import CLIP
from mobileclip2_jax.models.mci import MCiConfig
from mobileclip2_jax.models.text import TextConfig

IMAGE_PREFIX = "visual.trunk."
TEXT_PREFIX = "text."


def _reroot(rows: List[KeyEntry], scope: str, prefix: str) -> List[KeyEntry]:
    return [dataclasses.replace(r, flax_path=(scope,) + r.flax_path, torch_key=prefix + r.torch_key)
            for r in rows]


def open_clip_key_table(image_config: Any, text_config: Any, inference: bool = False) -> List[KeyEntry]:
    if isinstance(image_config, MCiConfig):
        image_rows = mci_key_table(image_config, inference)
    else:
        image_rows = vit_key_table(image_config)
    if not isinstance(text_config, TextConfig):
        raise ValueError("open_clip has no layout for the MCt text tower (MobileCLIP-S0 v1); "
                         "use the Apple package layout (mobileclip2_jax.convert.apple_layout)")
    return (_reroot(image_rows, "visual", IMAGE_PREFIX)
            + _reroot(text_key_table(text_config), "text", TEXT_PREFIX)
            + [KeyEntry("params", ("logit_scale",), "logit_scale", "vector")])


@functools.lru_cache(maxsize=16)
def clip_abstract_variables(image_config: Any, text_config: Any, inference: bool = False) -> Dict[str, Any]:
    """Shapes of :class:`CLIP` variables without allocating them (cached per config)."""
    size = getattr(image_config, "image_size", 256)
    images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    ids = jax.ShapeDtypeStruct((1, text_config.context_length), jnp.int32)
    model = CLIP(image_config, text_config, inference_mode=inference)
    return jax.eval_shape(model.init, jax.random.key(0), images, ids)


def _scalar_logit_scale(sd: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """``logit_scale`` is 0-d in open_clip and may be ``[1]`` elsewhere: store it 0-d."""
    v = sd.get("logit_scale")
    if v is not None and v.size == 1:
        sd = dict(sd)
        sd["logit_scale"] = v.reshape(())
    return sd


def is_reparameterized_state_dict(state_dict: Mapping[str, Any]) -> bool:
    """A folded (timm ``reparameterize_model``) MCi checkpoint has ``reparam_conv`` keys."""
    return any(".reparam_conv." in k for k in state_dict)


def clip_from_open_clip(state_dict: Mapping[str, Any], image_config: Any, text_config: Any,
                        inference: Optional[bool] = None, what: str = "CLIP") -> Dict[str, Any]:
    """open_clip state_dict (train or reparameterized form) → :class:`CLIP` variables, strictly."""
    sd = _scalar_logit_scale(normalize_state_dict(state_dict))
    if inference is None:
        inference = is_reparameterized_state_dict(sd)
    table = open_clip_key_table(image_config, text_config, inference)
    form = "inference" if inference else "train"
    return state_dict_to_variables(sd, table, clip_abstract_variables(image_config, text_config, inference),
                                   what=f"{what} ({form} form, open_clip layout)")


def clip_to_open_clip(variables: Mapping[str, Any], image_config: Any, text_config: Any,
                      inference: bool = False, what: str = "CLIP") -> Dict[str, np.ndarray]:
    """:class:`CLIP` variables → open_clip state_dict (numpy), strictly; loads with ``strict=True``."""
    variables = jax.tree.map(np.asarray, dict(variables))
    table = open_clip_key_table(image_config, text_config, inference)
    form = "inference" if inference else "train"
    return variables_to_state_dict(variables, table, what=f"{what} ({form} form, open_clip layout)")


def count_params(tree: Mapping[str, Any]) -> int:
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))


def tower_param_counts(variables: Mapping[str, Any]) -> Tuple[int, int]:
    """(image, text) trainable parameter counts, as ``sum(p.numel())`` over each torch tower."""
    params = variables["params"]
    return count_params(params["visual"]), count_params(params["text"])
