"""open_clip-style entry points: ``list_models``, ``create_model(_and_transforms)``, ``get_tokenizer``.

``pretrained`` is one of
- ``None``: random init (seeded), train form;
- a directory written by ``MobileCLIP.save`` (Orbax);
- an open_clip checkpoint file (``.safetensors`` read without torch; ``.pt``/``.pth``/``.bin`` via
  ``torch.load(weights_only=True)`` — never an unrestricted unpickle), train or reparameterized
  form (detected from its keys);
- an Apple ``mobileclip`` package checkpoint (MobileCLIP-S0 / -B v1; detected from its
  ``image_encoder.`` / ``text_encoder.`` keys), which selects Apple's form of the towers.
Nothing is ever downloaded: a pretrained *tag* (``"dfndr2b"``) is an error that says so.
"""
from __future__ import annotations

import functools
import pathlib
from typing import Any, Dict, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from mobileclip2_jax.clip_model import MobileCLIP
from mobileclip2_jax.data.preprocess import ImagePreprocessor, RandomResizedCropPreprocessor
from mobileclip2_jax.models.clip import CLIP
from mobileclip2_jax.models.vit import ViTConfig
from mobileclip2_jax.models.zoo import (ModelSpec, get_model_spec, image_tower_config, list_models,
                                        text_tower_config)
from mobileclip2_jax.tokenizers import ClipBpeTokenizer

__all__ = ["list_models", "create_model", "create_model_and_transforms", "get_tokenizer",
           "load_torch_checkpoint"]

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def get_tokenizer(name: str, context_length: Optional[int] = None) -> ClipBpeTokenizer:
    """The variant's tokenizer: CLIP BPE (ids identical to ``open_clip.get_tokenizer(name)``)."""
    spec = get_model_spec(name)
    return ClipBpeTokenizer(context_length=context_length or text_tower_config(spec).context_length)


def load_torch_checkpoint(path: "str | pathlib.Path") -> Dict[str, np.ndarray]:
    """A PyTorch checkpoint file as a ``{key: numpy array}`` dict (wrappers left for the layouts)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error type for corrupt headers
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
    if path.suffix in TORCH_SUFFIXES:
        try:
            import torch
        except ImportError:
            raise ImportError(f"reading {path} needs PyTorch: pip install '.[torch]' (or convert "
                              f"it to .safetensors)") from None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated zip, foreign pickle globals, …
            raise ValueError(f"{path}: cannot load as a weights-only PyTorch checkpoint ({e})") from e
        if not isinstance(obj, dict):
            raise ValueError(f"{path}: expected a state_dict (a dict of tensors), got {type(obj).__name__}")
        return obj
    raise ValueError(f"{path}: unknown checkpoint format {path.suffix!r}; expected a directory "
                     f"written by model.save(), .safetensors, or one of {', '.join(TORCH_SUFFIXES)}")


@functools.lru_cache(maxsize=16)
def _jitted_init(module: CLIP):
    """Compiled once per architecture. The forward pass runs at the towers' smallest valid
    input size: parameter shapes do not depend on it (except the ViT token grid)."""
    cfg = module.image_config
    size = cfg.image_size if isinstance(cfg, ViTConfig) else cfg.total_stride
    n = module.text_config.context_length
    ids = np.zeros((1, n), np.int32)
    ids[0, 1] = module.text_config.vocab_size - 1   # a valid row: start, end-of-text, padding
    return jax.jit(lambda key: module.init(key, jnp.zeros((1, size, size, 3), jnp.float32), ids))


def random_variables(module: CLIP, seed: int = 0) -> Dict[str, Any]:
    """Random-init variables (the modules' own initializers). The key uses the ``unsafe_rbg``
    PRNG: it compiles in half the time of threefry on CPU, and init needs no split guarantees."""
    return _jitted_init(module)(jax.random.key(seed, impl="unsafe_rbg"))


def create_model(name: str, pretrained: Optional[Union[str, pathlib.Path]] = None, *,
                 image_size: Optional[int] = None, vocab_size: Optional[int] = None,
                 dtype: Any = jnp.float32, seed: int = 0) -> MobileCLIP:
    """Builds a variant by its reference name, random or from a checkpoint (see module doc).

    ``image_size`` overrides the ViT token grid / the MCi preprocessing size (tests, ablations);
    ``vocab_size`` rewires the text tower for another tokenizer (e.g. SentencePiece).
    """
    spec: ModelSpec = get_model_spec(name)
    text_cfg = text_tower_config(spec, vocab_size)
    if pretrained is None:
        module = CLIP(image_tower_config(spec, image_size), text_cfg, dtype=dtype)
        return MobileCLIP(spec, module, random_variables(module, seed))

    path = pathlib.Path(pretrained)
    if not path.exists() and path.suffix == "" and "/" not in str(pretrained):
        raise ValueError(f"pretrained={pretrained!r} looks like a download tag; this package never "
                         f"downloads weights. Pass a local checkpoint file or directory.")
    if path.is_dir():
        return _load_orbax(spec, path, image_size, vocab_size, dtype)
    sd = load_torch_checkpoint(path)
    from mobileclip2_jax.convert import apple_layout
    if apple_layout.is_apple_layout(sd):
        if spec.apple_name is None:
            raise ValueError(f"{path} is an Apple mobileclip-package checkpoint, which exists only "
                             f"for MobileCLIP-S0 and MobileCLIP-B; not for {spec.name}")
        loaded = apple_layout.apple_clip_from_torch(sd, spec.name)
        module = CLIP(image_tower_config(spec, image_size, apple_form=True), text_cfg,
                      inference_mode=loaded["inference"], dtype=dtype)
        variables = _merge_towers(loaded["image"], loaded["text"], loaded["logit_scale"])
        return MobileCLIP(spec, module, variables, apple_form=True)
    from mobileclip2_jax.convert.clip_layout import clip_from_open_clip, is_reparameterized_state_dict
    inference = is_reparameterized_state_dict(sd)
    module = CLIP(image_tower_config(spec, image_size), text_cfg, inference_mode=inference, dtype=dtype)
    variables = clip_from_open_clip(sd, module.image_config, text_cfg, inference,
                                    what=f"{spec.name} from {path}")
    return MobileCLIP(spec, module, jax.tree.map(jnp.asarray, variables))


def _merge_towers(image: Dict[str, Any], text: Dict[str, Any], logit_scale: float) -> Dict[str, Any]:
    variables: Dict[str, Any] = {"params": {"visual": image["params"], "text": text["params"],
                                            "logit_scale": np.asarray(logit_scale, np.float32)}}
    stats = {k: t["batch_stats"] for k, t in (("visual", image), ("text", text)) if t.get("batch_stats")}
    if stats:
        variables["batch_stats"] = stats
    return jax.tree.map(jnp.asarray, variables)


def _load_orbax(spec: ModelSpec, path: pathlib.Path, image_size, vocab_size, dtype) -> MobileCLIP:
    from mobileclip2_jax.checkpoint.pretrained import load_variables, read_metadata
    from mobileclip2_jax.convert.clip_layout import clip_abstract_variables
    meta = read_metadata(path)
    if get_model_spec(meta["model"]).name != spec.name:
        raise ValueError(f"{path} holds a {meta['model']} checkpoint, not {spec.name}")
    apple_form = bool(meta.get("apple_form", False))
    image_cfg = image_tower_config(spec, image_size or meta.get("image_size"), apple_form=apple_form)
    text_cfg = text_tower_config(spec, vocab_size or meta.get("vocab_size"))
    inference = bool(meta.get("inference_mode", False))
    module = CLIP(image_cfg, text_cfg, inference_mode=inference, dtype=dtype)
    abstract = clip_abstract_variables(image_cfg, text_cfg, inference)
    return MobileCLIP(spec, module, load_variables(path, abstract), apple_form=apple_form)


def create_model_and_transforms(name: str, pretrained: Optional[Union[str, pathlib.Path]] = None, **kwargs
                                ) -> Tuple[MobileCLIP, RandomResizedCropPreprocessor, ImagePreprocessor]:
    """``(model, preprocess_train, preprocess_val)`` as in open_clip; the preprocessors carry the
    variant's own size, interpolation and mean/std."""
    model = create_model(name, pretrained, **kwargs)
    cfg = model.spec.preprocess
    if kwargs.get("image_size"):
        import dataclasses
        cfg = dataclasses.replace(cfg, image_size=int(kwargs["image_size"]))
    return model, RandomResizedCropPreprocessor(cfg), ImagePreprocessor(cfg)
