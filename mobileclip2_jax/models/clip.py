"""The two-tower CLIP model: an image tower, a text tower and a learnable logit scale.

Mirrors open_clip's ``CustomTextCLIP`` as MobileCLIP configures it (``architecture.md`` §1, §6):
the image tower ends in its own projection (timm ``head.fc`` / Apple ``proj``), the text tower
in ``text_projection``; ``logit_scale`` is a scalar initialised to ``ln(1/0.07)``; there is no
logit bias. Feature L2-normalisation happens here, outside the towers, as in the reference.

Towers are chosen by their configs' types, so any image tower (MCi or ViT) can pair with any
text tower (base transformer or MCt) — the 13 released pairings live in
:mod:`mobileclip2_jax.models.zoo`. Variables: ``params/{visual,text,logit_scale}`` and
``batch_stats/{visual,text}`` (BatchNorm towers only).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Union

import jax
import jax.numpy as jnp
from flax import linen as nn

from mobileclip2_jax.models.mci import MCi, MCiConfig
from mobileclip2_jax.models.text import TextConfig, TextTransformer
from mobileclip2_jax.models.vit import ViT, ViTConfig

Dtype = Any
INIT_LOGIT_SCALE = math.log(1 / 0.07)


def _mct():
    # Imported lazily so the base towers never depend on the MCt module's import cost.
    from mobileclip2_jax.models import mct_text
    return mct_text


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """``x / max(||x||, eps)`` over the last axis in fp32 — torch ``F.normalize``, as open_clip."""
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    norm = jnp.sqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True))
    return (x32 / jnp.maximum(norm, eps)).astype(x.dtype)


def build_image_tower(config: Union[MCiConfig, ViTConfig], inference_mode: bool = False,
                      drop_path_rate: float = 0.0, dtype: Dtype = jnp.float32, name: str = "visual"
                      ) -> nn.Module:
    if isinstance(config, MCiConfig):
        return MCi(config, inference_mode=inference_mode, drop_path_rate=drop_path_rate,
                   dtype=dtype, name=name)
    if isinstance(config, ViTConfig):
        return ViT(config, dtype=dtype, name=name)
    raise TypeError(f"unknown image tower config type {type(config).__name__}")


def build_text_tower(config: Any, inference_mode: bool = False, dtype: Dtype = jnp.float32,
                     name: str = "text") -> nn.Module:
    if isinstance(config, TextConfig):
        return TextTransformer(config, dtype=dtype, name=name)
    mct = _mct()
    if isinstance(config, mct.MCtConfig):
        return mct.MCtTextTransformer(config, inference_mode=inference_mode, dtype=dtype, name=name)
    raise TypeError(f"unknown text tower config type {type(config).__name__}")


def tower_has_batch_norm(config: Any) -> bool:
    """Whether a tower keeps ``batch_stats`` (MCi, the ViT-B conv stem, MCt's RepMixers)."""
    if isinstance(config, MCiConfig):
        return True
    if isinstance(config, ViTConfig):
        return config.stem == "mci_conv"
    return not isinstance(config, TextConfig)


class CLIP(nn.Module):
    """``encode_image``, ``encode_text`` and ``__call__`` (both + ``exp(logit_scale)``)."""
    image_config: Union[MCiConfig, ViTConfig]
    text_config: Any
    inference_mode: bool = False
    drop_path_rate: float = 0.0
    dtype: Dtype = jnp.float32

    def setup(self):
        self.visual = build_image_tower(self.image_config, self.inference_mode, self.drop_path_rate,
                                        self.dtype)
        self.text = build_text_tower(self.text_config, self.inference_mode, self.dtype)
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(INIT_LOGIT_SCALE), ())

    def encode_image(self, images: jax.Array, normalize: bool = True, train: bool = False) -> jax.Array:
        """``(B, H, W, 3)`` preprocessed NHWC images → ``(B, embed_dim)``."""
        features = self.visual(images, train=train)
        return l2_normalize(features) if normalize else features

    def encode_text(self, token_ids: jax.Array, normalize: bool = True, train: bool = False) -> jax.Array:
        """``(B, context_length)`` int ids (full length, zero-padded) → ``(B, embed_dim)``."""
        if isinstance(self.text_config, TextConfig):
            features = self.text(token_ids)
        else:
            features = self.text(token_ids, train=train)
        return l2_normalize(features) if normalize else features

    def __call__(self, images: jax.Array, token_ids: jax.Array, train: bool = False
                 ) -> Dict[str, jax.Array]:
        return {"image_features": self.encode_image(images, True, train),
                "text_features": self.encode_text(token_ids, True, train),
                "logit_scale": jnp.exp(self.logit_scale)}
