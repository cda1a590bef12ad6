"""The 13 released MobileCLIP / MobileCLIP2 variants by their reference names.

Each :class:`ModelSpec` fixes everything a caller could otherwise get wrong: the image and
text towers, the embedding dim, and the evaluation preprocessing (``architecture.md`` §1,
§2.5). The specs also record which PyTorch reference defines the variant, which the parity
tests use:

- open_clip defines MobileCLIP-S1/S2/B and all MobileCLIP2 variants. MobileCLIP-S3/S4/L-14
  (v1) are not in open_clip's registry, but Apple's configs for them are byte-identical to
  the MobileCLIP2 ones, so the MobileCLIP2 open_clip model is their reference.
- MobileCLIP-S0 (v1) exists only in Apple's ``mobileclip`` package (its MCt text tower has no
  open_clip counterpart).
- MobileCLIP-B (v1) exists in two forms that are *different functions* of the same weights
  (§2.3): open_clip/timm's ``vit_base_mci_224`` (stem padding 0, LN eps 1e-6) — the default
  here, as open_clip ships it — and Apple's ``vit_b16`` (padding 1, eps 1e-5), which a
  checkpoint in Apple's package layout selects (``image_tower_apple``).

Preprocessing of MobileCLIP-S3/S4/L-14 (v1) is not recorded in open_clip or timm (§9); they
take the MobileCLIP2 constants of the same architecture (OpenAI mean/std), flagged by
``preprocess_verified=False``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Union

from mobileclip2_jax.data.preprocess import OPENAI_MEAN, OPENAI_STD, PreprocessConfig
from mobileclip2_jax.models.mci import MCI_CONFIGS, MCiConfig
from mobileclip2_jax.models.text import TEXT_CONFIGS, TextConfig
from mobileclip2_jax.models.vit import VIT_CONFIGS, ViTConfig


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    image_tower: str                  # key of MCI_CONFIGS / VIT_CONFIGS
    text_tower: str                   # key of TEXT_CONFIGS, or "mct"
    embed_dim: int
    preprocess: PreprocessConfig
    open_clip_name: Optional[str]     # the open_clip model that defines the same function
    apple_name: Optional[str] = None  # Apple ``mobileclip`` package model name, if it has one
    image_tower_apple: Optional[str] = None  # image tower when loading the Apple layout
    preprocess_verified: bool = True

    @property
    def image_size(self) -> int:
        return self.preprocess.image_size


def _raw(size: int) -> PreprocessConfig:        # open_clip ``_mccfg``: pixels in [0, 1]
    return PreprocessConfig(size)


def _openai(size: int, interpolation: str = "bilinear") -> PreprocessConfig:  # ``_mc2cfg``
    return PreprocessConfig(size, OPENAI_MEAN, OPENAI_STD, interpolation)


_SPECS = [
    ModelSpec("MobileCLIP-S0", "mci0", "mct", 512, _raw(256), None, "mobileclip_s0", "mci0"),
    ModelSpec("MobileCLIP-S1", "mci1", "base512", 512, _raw(256), "MobileCLIP-S1"),
    ModelSpec("MobileCLIP-S2", "mci2", "base512", 512, _raw(256), "MobileCLIP-S2"),
    ModelSpec("MobileCLIP-B", "vit_b16_mci", "base512_causal", 512, _raw(224), "MobileCLIP-B",
              "mobileclip_b", "vit_b16_mci_apple"),
    ModelSpec("MobileCLIP-S3", "mci3", "base768", 768, _openai(256), "MobileCLIP2-S3",
              preprocess_verified=False),
    ModelSpec("MobileCLIP-S4", "mci4", "base768", 768, _openai(256), "MobileCLIP2-S4",
              preprocess_verified=False),
    ModelSpec("MobileCLIP-L-14", "vit_l14", "base768", 768, _openai(224, "bicubic"),
              "MobileCLIP2-L-14", preprocess_verified=False),
    ModelSpec("MobileCLIP2-S0", "mci0", "base512", 512, _raw(256), "MobileCLIP2-S0"),
    ModelSpec("MobileCLIP2-S2", "mci2", "base512", 512, _raw(256), "MobileCLIP2-S2"),
    ModelSpec("MobileCLIP2-B", "vit_b16_mci", "base512_causal", 512, _raw(224), "MobileCLIP2-B"),
    ModelSpec("MobileCLIP2-S3", "mci3", "base768", 768, _openai(256), "MobileCLIP2-S3"),
    ModelSpec("MobileCLIP2-S4", "mci4", "base768", 768, _openai(256), "MobileCLIP2-S4"),
    ModelSpec("MobileCLIP2-L-14", "vit_l14", "base768", 768, _openai(224, "bicubic"),
              "MobileCLIP2-L-14"),
]
MODEL_SPECS: Dict[str, ModelSpec] = {s.name: s for s in _SPECS}


def list_models() -> List[str]:
    """The variant names, as open_clip / Apple name them."""
    return list(MODEL_SPECS)


def get_model_spec(name: str) -> ModelSpec:
    """Spec by name (case-insensitive, ``_``/``-`` and a ``/`` in ``L/14`` tolerated)."""
    if isinstance(name, ModelSpec):
        return name
    key = str(name).strip().lower().replace("_", "-").replace("/", "-")
    for spec in _SPECS:
        if spec.name.lower() == key:
            return spec
    raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")


def image_tower_config(spec: ModelSpec, image_size: Optional[int] = None, apple_form: bool = False
                       ) -> Union[MCiConfig, ViTConfig]:
    """The image tower's config; ``image_size`` overrides the ViT token grid (MCi is size-free)."""
    name = spec.image_tower_apple if apple_form else spec.image_tower
    if name is None:
        raise ValueError(f"{spec.name} has no Apple-package form")
    if name in MCI_CONFIGS:
        cfg = MCI_CONFIGS[name]
        return cfg if image_size is None else dataclasses.replace(cfg, image_size=image_size)
    cfg = VIT_CONFIGS[name]
    if image_size is not None and image_size != cfg.image_size:
        if image_size % cfg.patch_size:
            raise ValueError(f"{spec.name}: image_size {image_size} is not a multiple of the patch "
                             f"size {cfg.patch_size}")
        cfg = dataclasses.replace(cfg, image_size=image_size)
    return cfg


def text_tower_config(spec: ModelSpec, vocab_size: Optional[int] = None) -> Any:
    """The text tower's config; ``vocab_size`` rewires it for a new (e.g. SentencePiece) vocab."""
    if spec.text_tower == "mct":
        from mobileclip2_jax.models.mct_text import MCT_CONFIGS
        cfg = MCT_CONFIGS["mct"]
    else:
        cfg: TextConfig = TEXT_CONFIGS[spec.text_tower]
    return cfg if vocab_size is None else dataclasses.replace(cfg, vocab_size=vocab_size)
