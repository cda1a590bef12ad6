"""``MobileCLIP``: a variant's Flax :class:`CLIP` module bound to its variables.

What :func:`mobileclip2_jax.create_model_and_transforms` returns. It plays the role of
open_clip's ``nn.Module`` for inference: ``encode_image`` / ``encode_text`` take numpy or JAX
arrays and return JAX arrays (L2-normalised by default), each a cached ``jax.jit`` of the pure
Flax method. Inputs are validated on the host first — wrong layout, token ids outside the
vocabulary or rows without an end-of-text token are ``ValueError``s, never silent garbage.

Training code uses :attr:`module` and :attr:`variables` directly (pure functions, sharded by
the caller); this class holds no training state.
"""
from __future__ import annotations

import functools
import pathlib
from typing import Any, Dict, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mobileclip2_jax.models.clip import CLIP
from mobileclip2_jax.models.reparam import reparameterize as reparameterize_variables
from mobileclip2_jax.models.text import TextConfig, check_token_ids
from mobileclip2_jax.models.zoo import ModelSpec


@functools.lru_cache(maxsize=64)
def _jitted_encoder(image_config: Any, text_config: Any, inference_mode: bool, dtype: Any, which: str,
                    normalize: bool):
    """One compiled encoder per architecture, shared by every model instance of it (variants
    with the same towers — e.g. MobileCLIP-S3 and MobileCLIP2-S3 — reuse the executable)."""
    module = CLIP(image_config, text_config, inference_mode=inference_mode, dtype=dtype)
    method = CLIP.encode_image if which == "image" else CLIP.encode_text
    return jax.jit(functools.partial(module.apply, method=method, normalize=normalize))


class MobileCLIP:
    def __init__(self, spec: ModelSpec, module: CLIP, variables: Mapping[str, Any],
                 apple_form: bool = False):
        self.spec = spec
        self.module = module
        self.variables = variables
        self.apple_form = apple_form

    def __repr__(self) -> str:
        form = "reparameterized" if self.inference_mode else "train"
        img, txt = self.param_counts()
        return (f"MobileCLIP({self.spec.name!r}, {form} form{', Apple layout' if self.apple_form else ''}, "
                f"image {img / 1e6:.3f} M + text {txt / 1e6:.3f} M params)")

    # -- properties ---------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def inference_mode(self) -> bool:
        return self.module.inference_mode

    @property
    def image_config(self):
        return self.module.image_config

    @property
    def text_config(self):
        return self.module.text_config

    @property
    def context_length(self) -> int:
        return self.text_config.context_length

    @property
    def logit_scale(self) -> float:
        """``exp(logit_scale)``: the temperature-inverse multiplying cosine similarities."""
        return float(np.exp(np.asarray(self.variables["params"]["logit_scale"])))

    def param_counts(self):
        """(image tower, text tower) parameter counts, comparable to ``sum(p.numel())`` in torch."""
        p = self.variables["params"]
        count = lambda t: int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(t)))  # noqa: E731
        return count(p["visual"]), count(p["text"])

    # -- inference ----------------------------------------------------------------------------
    def _encoder(self, which: str, normalize: bool):
        m = self.module
        inference = m.inference_mode
        if which == "text" and isinstance(m.text_config, TextConfig):
            inference = False  # nothing to fold in the base text tower: share one executable
        return _jitted_encoder(m.image_config, m.text_config, inference, m.dtype, which, bool(normalize))

    def _tower_variables(self, scope: str) -> Dict[str, Any]:
        """Only one tower's variables go into its jitted encoder, so a reparameterized image
        tower does not retrace the text encoder (and vice versa)."""
        out = {c: {scope: tree[scope]} for c, tree in self.variables.items()
               if isinstance(tree, Mapping) and scope in tree}
        out["params"]["logit_scale"] = self.variables["params"]["logit_scale"]
        return out

    def _check_images(self, images: Any) -> jax.Array:
        shape = tuple(np.shape(images))
        if len(shape) != 4 or shape[-1] != 3:
            hint = " (this looks like NCHW: transpose to NHWC)" if len(shape) == 4 and shape[1] == 3 else ""
            raise ValueError(f"{self.name}: expected preprocessed images of shape (batch, height, "
                             f"width, 3) NHWC float; got shape {shape}{hint}. Use the preprocess "
                             f"returned by create_model_and_transforms (its .batch(images)).")
        if not jnp.issubdtype(jnp.asarray(images).dtype, jnp.floating):
            raise ValueError(f"{self.name}: images must be float (preprocessed, normalized); got "
                             f"dtype {np.asarray(images).dtype}")
        return jnp.asarray(images, jnp.float32)

    def encode_image(self, images: Any, normalize: bool = True) -> jax.Array:
        """``(B, H, W, 3)`` preprocessed images → ``(B, embed_dim)`` features."""
        return self._encoder("image", normalize)(self._tower_variables("visual"), self._check_images(images))

    def encode_text(self, token_ids: Any, normalize: bool = True) -> jax.Array:
        """``(B, context_length)`` token ids (from :func:`get_tokenizer`) → ``(B, embed_dim)``."""
        ids = np.asarray(token_ids)
        check_token_ids(ids, self.context_length, eot_id=self.text_config.vocab_size - 1)
        return self._encoder("text", normalize)(self._tower_variables("text"), jnp.asarray(ids, jnp.int32))

    def __call__(self, images: Any, token_ids: Any) -> Dict[str, jax.Array]:
        return {"image_features": self.encode_image(images), "text_features": self.encode_text(token_ids),
                "logit_scale": jnp.asarray(self.logit_scale)}

    # -- transformations ----------------------------------------------------------------------
    def reparameterize(self) -> "MobileCLIP":
        """The exact inference form (MobileOne/RepMixer/RepCPE branches folded), as a new model.

        Like ``timm.utils.reparameterize_model`` this returns a new object; the train-form model
        is unchanged. Towers with nothing to fold (ViT, the base text tower) pass through.
        """
        if self.inference_mode:
            return self
        module = self.module.clone(inference_mode=True)
        variables = jax.jit(reparameterize_variables)(self.variables)
        return MobileCLIP(self.spec, module, variables, self.apple_form)

    def state_dict(self, layout: str = "open_clip") -> Dict[str, np.ndarray]:
        """PyTorch state_dict (numpy arrays): ``"open_clip"`` or ``"apple"`` package layout, in
        this model's form (train, or reparameterized with timm's / Apple's fused key names)."""
        if layout == "open_clip":
            if self.apple_form:
                raise ValueError(f"{self.name} was loaded in Apple's form, which open_clip's model "
                                 f"computes differently (architecture.md §2.3); export "
                                 f"layout='apple'")
            from mobileclip2_jax.convert.clip_layout import clip_to_open_clip
            return clip_to_open_clip(self.variables, self.image_config, self.text_config,
                                     self.inference_mode, what=self.name)
        if layout == "apple":
            from mobileclip2_jax.convert import apple_layout
            v = self.variables
            split = lambda name: {c: v[c][name] for c in v if name in v[c]}  # noqa: E731
            return apple_layout.apple_clip_to_torch(split("visual"), split("text"),
                                                    float(np.asarray(v["params"]["logit_scale"])),
                                                    self.name)
        raise ValueError(f"layout must be 'open_clip' or 'apple'; got {layout!r}")

    def save(self, directory: "str | pathlib.Path", overwrite: bool = False) -> pathlib.Path:
        """Writes an Orbax checkpoint that ``create_model_and_transforms(name, pretrained=dir)`` loads."""
        from mobileclip2_jax.checkpoint.pretrained import save_variables
        meta = {"model": self.name, "inference_mode": self.inference_mode, "apple_form": self.apple_form,
                "image_size": int(getattr(self.image_config, "image_size", self.spec.image_size)),
                "vocab_size": int(self.text_config.vocab_size)}
        return save_variables(directory, self.variables, meta, overwrite=overwrite)

