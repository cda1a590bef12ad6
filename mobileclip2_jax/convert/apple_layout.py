"""Apple ``mobileclip`` package layout ↔ Flax variables, for the two Apple-only checkpoints.

MobileCLIP-S0 (v1) and MobileCLIP-B (v1) exist as checkpoints of Apple's own ``mobileclip``
package (apple/ml-mobileclip), a ``CLIP`` module with ``image_encoder.model.*``,
``text_encoder.*`` and ``logit_scale`` (``shared/docs/architecture.md`` §5.2–§5.4,
``state_dict_keys.md``):

=================  ==========================================  ===================================
variant            image tower (Flax)                          text tower (Flax)
=================  ==========================================  ===================================
``MobileCLIP-S0``  ``MCi(get_mci_config("mci0"))``              ``MCtTextTransformer(MCtConfig())``
``MobileCLIP-B``   ``ViT(VIT_CONFIGS["vit_b16_mci_apple"])``    ``TextTransformer(TEXT_CONFIGS[``
                                                               ``"base512_causal"])``
=================  ==========================================  ===================================

(:data:`APPLE_VARIANTS`; Apple's ``vit_b16`` is *not* timm's ``vit_base_mci_224``: stem
padding 1 and LN eps 1e-5, §2.3.) The key tables are explicit :class:`KeyEntry` rows. The MCi
rows are those of :func:`~mobileclip2_jax.convert.mci_layout.mci_key_table` with every timm key
renamed to Apple's by :func:`apple_mci_key` — the inverse of timm's ``checkpoint_filter_fn``
(§5.3): ``network.k`` flat list, ``rbr_conv/rbr_scale/rbr_skip``, ``lkb_origin``,
``convffn``, ``conv_exp.se.reduce/expand``, bare layer-scale Parameters. Both forms are
covered: train form, and the form Apple's ``reparameterize_model`` leaves (``reparam_conv``,
``lkb_reparam``), detected from the keys.

Two layout differences are not a transpose:
- Apple's image projections (``head.proj [1024, 512]``, ``classifier.proj [768, 512]``) are
  ``x @ proj`` without bias, while our heads are ``Dense`` with a bias. Import sets the bias
  to 0; export raises ``ValueError`` for a nonzero bias, since Apple's model cannot express it.
- Apple's positional tables are ``[1, 1, N, D]``; ours are ``[N, D]`` (text) and
  ``[1, N, D]`` (ViT). They are reshaped around the table (only from/to ``[1, 1, N, D]``).
"""
from __future__ import annotations

import functools
import re
from typing import Any, Dict, List, Mapping, NamedTuple, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from mobileclip2_jax.convert.mci_layout import mci_abstract_variables, mci_key_table
from mobileclip2_jax.convert.text_layout import text_abstract_variables
from mobileclip2_jax.convert.torch_layout import (KeyEntry, StateDictMismatchError, batchnorm_keys, conv_keys,
                                                  layernorm_keys, linear_keys, normalize_state_dict,
                                                  state_dict_to_variables, variables_to_state_dict)
from mobileclip2_jax.convert.vit_layout import vit_abstract_variables
from mobileclip2_jax.models.mci import MCi, MCiConfig, get_mci_config
from mobileclip2_jax.models.mct_text import MCT_CONFIGS, MCtConfig, MCtTextTransformer
from mobileclip2_jax.models.text import TEXT_CONFIGS, TextConfig, TextTransformer
from mobileclip2_jax.models.vit import VIT_CONFIGS, ViT, ViTConfig

Path = Tuple[str, ...]
IMAGE_PREFIX = "image_encoder.model."
TEXT_PREFIX = "text_encoder."
POS_SUFFIX = "pos_embed.pos_embed"   # Apple PositionalEmbedding.pos_embed (Learnable…).pos_embed, [1, 1, N, D]


class AppleVariant(NamedTuple):
    """The Flax towers of an Apple-package CLIP: config names of the image and text tower."""
    image: str     # MCi config ("mci0") or ViT config ("vit_b16_mci_apple")
    text: str      # "mct" (MCT_CONFIGS) or a TEXT_CONFIGS name ("base512_causal")

    @property
    def image_config(self) -> Union[MCiConfig, ViTConfig]:
        return VIT_CONFIGS[self.image] if self.image in VIT_CONFIGS else get_mci_config(self.image)

    @property
    def text_config(self) -> Union[MCtConfig, TextConfig]:
        return MCT_CONFIGS[self.text] if self.text in MCT_CONFIGS else TEXT_CONFIGS[self.text]

    def image_module(self, inference_mode: bool = False, **kw: Any) -> nn.Module:
        cfg = self.image_config
        return ViT(cfg, **kw) if isinstance(cfg, ViTConfig) else MCi(cfg, inference_mode=inference_mode, **kw)

    def text_module(self, inference_mode: bool = False, **kw: Any) -> nn.Module:
        cfg = self.text_config
        if isinstance(cfg, MCtConfig):
            return MCtTextTransformer(cfg, inference_mode=inference_mode, **kw)
        return TextTransformer(cfg, **kw)


APPLE_VARIANTS: Dict[str, AppleVariant] = {
    "MobileCLIP-S0": AppleVariant("mci0", "mct"),                        # mobileclip_s0.json
    "MobileCLIP-B": AppleVariant("vit_b16_mci_apple", "base512_causal"),  # mobileclip_b.json
}
_ALIASES = {"mobileclip_s0": "MobileCLIP-S0", "mobileclip_b": "MobileCLIP-B"}


def get_apple_variant(variant: str) -> AppleVariant:
    """``"MobileCLIP-S0"``/``"MobileCLIP-B"`` (or Apple's ``mobileclip_s0``/``mobileclip_b``)."""
    name = _ALIASES.get(variant, variant)
    if name not in APPLE_VARIANTS:
        raise ValueError(f"no Apple-package layout for {variant!r}; expected one of "
                         f"{sorted(APPLE_VARIANTS)} (other variants load through open_clip's layout)")
    return APPLE_VARIANTS[name]


# ----------------------------------------------------------------------------- image: MCi
def apple_network_index(cfg: MCiConfig) -> Dict[Tuple[int, str], int]:
    """Apple FastViT's flat ``network`` list: per stage [PatchEmbed], [RepCPE], blocks."""
    index, k = {}, 0
    for i in range(cfg.num_stages):
        for part, present in (("downsample", cfg.downsamples()[i]), ("pos_emb", cfg.pos_embs[i]),
                              ("blocks", True)):
            if present:
                index[(i, part)] = k
                k += 1
    return index


_STAGE = re.compile(r"stages\.(\d+)\.(downsample|pos_emb|blocks)\.(.*)")
_SEGMENTS = {"conv_kxk": "rbr_conv", "conv_scale": "rbr_scale", "identity": "rbr_skip",
             "large_conv": "lkb_origin", "mlp": "convffn", "pos_enc": "pe", "stem": "patch_embed",
             "final_conv": "conv_exp"}


def apple_mci_key(timm_key: str, network_index: Mapping[Tuple[int, str], int]) -> str:
    """timm ``fastvit_mci*`` key → Apple ``mci*`` key (without ``image_encoder.model.``)."""
    m = _STAGE.fullmatch(timm_key)
    key = f"network.{network_index[(int(m[1]), m[2])]}.{m[3]}" if m else timm_key
    segs = [_SEGMENTS.get(s, s) for s in key.split(".") if s != "gamma"]   # bare layer scales
    if segs[0] == "conv_exp" and segs[1] == "se":
        segs[2] = {"fc1": "reduce", "fc2": "expand"}[segs[2]]              # Apple SEBlock names
    if m and m[2] == "downsample" and segs[3:5] == ["0", "reparam_conv"]:
        segs[4] = "lkb_reparam"                                              # ReparamLargeKernelConv
    return ".".join(segs)


def apple_mci_key_table(cfg: MCiConfig, inference: bool = False) -> List[KeyEntry]:
    index = apple_network_index(cfg)
    rows = [KeyEntry(e.collection, e.flax_path, apple_mci_key(e.torch_key, index), e.transform)
            for e in mci_key_table(cfg, inference) if not e.torch_key.startswith("head.")]
    return rows + [KeyEntry("params", ("head_fc", "kernel"), "head.proj", "vector")]   # x @ proj


# ----------------------------------------------------------------------------- image: ViT
def apple_encoder_keys(fp: Path, tp: str, names: Tuple[Path, ...]) -> List[KeyEntry]:
    """Apple ``TransformerEncoder`` (pre_norm_mha = [LN, MHA], pre_norm_ffn = [LN, fc1, act, drop, fc2])."""
    ln1, qkv, out, ln2, fc1, fc2 = names
    return (layernorm_keys(fp + ln1, f"{tp}.pre_norm_mha.0")
            + linear_keys(fp + qkv, f"{tp}.pre_norm_mha.1.qkv_proj")   # rows q | k | v, like ours
            + linear_keys(fp + out, f"{tp}.pre_norm_mha.1.out_proj")
            + layernorm_keys(fp + ln2, f"{tp}.pre_norm_ffn.0")
            + linear_keys(fp + fc1, f"{tp}.pre_norm_ffn.1")
            + linear_keys(fp + fc2, f"{tp}.pre_norm_ffn.4"))


VIT_BLOCK_NAMES = (("norm1",), ("qkv",), ("proj",), ("norm2",), ("fc1",), ("fc2",))
TEXT_BLOCK_NAMES = (("ln_1",), ("attn", "in_proj"), ("attn", "out_proj"), ("ln_2",), ("c_fc",), ("c_proj",))


def apple_vit_key_table(cfg: ViTConfig) -> List[KeyEntry]:
    if cfg.stem != "mci_conv":
        raise ValueError(f"Apple's vit_b16 has the conv stem; {cfg.name} has stem {cfg.stem!r}")
    rows = (conv_keys(("stem_0",), "patch_emb.0.block.conv", False)
            + batchnorm_keys(("stem_0_bn",), "patch_emb.0.block.norm")
            + conv_keys(("stem_1",), "patch_emb.1.block.conv", False)
            + batchnorm_keys(("stem_1_bn",), "patch_emb.1.block.norm")
            + conv_keys(("stem_2",), "patch_emb.2.block.conv", True)
            + [KeyEntry("params", ("cls_token",), "cls_token", "vector"),
               KeyEntry("params", ("pos_embed",), f"pos_embed.{POS_SUFFIX}", "vector")])
    for i in range(cfg.depth):
        rows += apple_encoder_keys((f"blocks_{i}",), f"transformer.{i}", VIT_BLOCK_NAMES)
    return (rows + layernorm_keys(("norm",), "post_transformer_norm")
            + [KeyEntry("params", ("head", "kernel"), "classifier.proj", "vector")])   # x @ proj


# ----------------------------------------------------------------------------- text
def apple_text_repmixer_keys(fp: Path, tp: str, inference: bool) -> List[KeyEntry]:
    """Apple text ``RepMixerBlock`` (``token_mixer`` + ``convffn`` + ``layer_scale``)."""
    tm, ttm = fp + ("token_mixer",), f"{tp}.token_mixer"
    if inference:
        rows = conv_keys(tm + ("reparam_conv",), f"{ttm}.reparam_conv", True)
    else:
        rows = (batchnorm_keys(tm + ("norm", "identity"), f"{ttm}.norm.rbr_skip")
                + batchnorm_keys(tm + ("mixer", "identity"), f"{ttm}.mixer.rbr_skip")
                + conv_keys(tm + ("mixer", "conv_kxk_0", "conv"), f"{ttm}.mixer.rbr_conv.0.conv", False)
                + batchnorm_keys(tm + ("mixer", "conv_kxk_0", "bn"), f"{ttm}.mixer.rbr_conv.0.bn")
                + [KeyEntry("params", tm + ("layer_scale",), f"{ttm}.layer_scale", "layer_scale")])
    return (rows
            + conv_keys(fp + ("mlp", "conv", "conv"), f"{tp}.convffn.conv.conv", False)
            + batchnorm_keys(fp + ("mlp", "conv", "bn"), f"{tp}.convffn.conv.bn")
            + conv_keys(fp + ("mlp", "fc1"), f"{tp}.convffn.fc1", True)
            + conv_keys(fp + ("mlp", "fc2"), f"{tp}.convffn.fc2", True)
            + [KeyEntry("params", fp + ("layer_scale",), f"{tp}.layer_scale", "layer_scale")])


def apple_text_key_table(cfg: Union[MCtConfig, TextConfig], inference: bool = False) -> List[KeyEntry]:
    """Apple ``TextTransformer``: ``mct`` (:class:`MCtConfig`) or ``base`` (:class:`TextConfig`)."""
    rows = [KeyEntry("params", ("token_embedding",), "embedding_layer.weight", "vector"),
            KeyEntry("params", ("positional_embedding",), f"positional_embedding.{POS_SUFFIX}", "vector")]
    if isinstance(cfg, MCtConfig):
        for i, kind in enumerate(cfg.layout):
            fp, tp = (f"transformer_{i}",), f"transformer.{i}"
            rows += (apple_text_repmixer_keys(fp, tp, inference) if kind == "repmixer"
                     else apple_encoder_keys(fp, tp, TEXT_BLOCK_NAMES))
    else:
        for i in range(cfg.layers):
            rows += apple_encoder_keys((f"resblocks_{i}",), f"transformer.{i}", TEXT_BLOCK_NAMES)
    return (rows + layernorm_keys(("ln_final",), "final_layer_norm")
            + [KeyEntry("params", ("text_projection",), "projection_layer", "vector")])   # x @ P


@functools.lru_cache(maxsize=4)
def mct_abstract_variables(cfg: MCtConfig, inference: bool = False) -> Dict[str, Any]:
    ids = jax.ShapeDtypeStruct((1, cfg.context_length), jnp.int32)
    return jax.eval_shape(MCtTextTransformer(cfg, inference_mode=inference).init, jax.random.key(0), ids)


# ----------------------------------------------------------------------------- per tower
def _image_spec(v: AppleVariant, inference: bool):
    cfg = v.image_config
    if isinstance(cfg, ViTConfig):
        return apple_vit_key_table(cfg), vit_abstract_variables(cfg), "head"
    return apple_mci_key_table(cfg, inference), mci_abstract_variables(cfg, inference), "head_fc"


def _text_spec(v: AppleVariant, inference: bool):
    cfg = v.text_config
    if isinstance(cfg, MCtConfig):
        return apple_text_key_table(cfg, inference), mct_abstract_variables(cfg, inference)
    return apple_text_key_table(cfg), text_abstract_variables(cfg)


def _is_reparameterized(keys, prefix: str) -> bool:
    return any(k.startswith(prefix) and (".reparam_conv." in k or ".lkb_reparam." in k) for k in keys)


def _squeeze_pos(sd: Dict[str, np.ndarray], key: str, flax_shape: Tuple[int, ...]) -> None:
    """Apple ``[1, 1, N, D]`` positional table → the Flax shape (strictly; other keys untouched)."""
    if key not in sd:
        return                               # reported as missing by the table
    v = sd[key]
    if tuple(v.shape) != (1, 1) + tuple(flax_shape[-2:]):
        raise StateDictMismatchError(f"state_dict does not match the Apple layout:\n  mis-shaped keys (1):\n"
                                     f"    {key}: got {tuple(v.shape)}, expected {(1, 1) + tuple(flax_shape[-2:])}")
    sd[key] = v.reshape(flax_shape)


def _form(inference: bool) -> str:
    return "inference" if inference else "train"


def _tower_from_torch(sd: Dict[str, np.ndarray], table, abstract, prefix: str, what: str) -> Dict[str, Any]:
    sd = dict(sd)
    pos_rows = [e for e in table if e.torch_key.endswith(POS_SUFFIX)]
    for e in pos_rows:
        _squeeze_pos(sd, prefix + e.torch_key, abstract["params"][e.flax_path[0]].shape)
    return state_dict_to_variables(sd, table, abstract, prefix=prefix, what=what)


def apple_image_from_torch(state_dict: Mapping[str, Any], variant: str) -> Dict[str, Any]:
    """``image_encoder.model.*`` of an Apple CLIP state_dict → Flax image-tower variables (head bias 0)."""
    v, sd = get_apple_variant(variant), normalize_state_dict(state_dict)
    inference = _is_reparameterized(sd, IMAGE_PREFIX) and isinstance(v.image_config, MCiConfig)
    table, abstract, head = _image_spec(v, inference)
    out = _tower_from_torch(sd, table, abstract, IMAGE_PREFIX,
                            f"{variant} image tower {v.image} (Apple layout, {_form(inference)} form)")
    out["params"][head]["bias"] = np.zeros(abstract["params"][head]["bias"].shape, np.float32)
    return out


def apple_text_from_torch(state_dict: Mapping[str, Any], variant: str) -> Dict[str, Any]:
    """``text_encoder.*`` of an Apple CLIP state_dict → Flax text-tower variables."""
    v, sd = get_apple_variant(variant), normalize_state_dict(state_dict)
    inference = _is_reparameterized(sd, TEXT_PREFIX) and isinstance(v.text_config, MCtConfig)
    table, abstract = _text_spec(v, inference)
    return _tower_from_torch(sd, table, abstract, TEXT_PREFIX,
                             f"{variant} text tower {v.text} (Apple layout, {_form(inference)} form)")


# ----------------------------------------------------------------------------- public API
def is_apple_layout(state_dict: Mapping[str, Any]) -> bool:
    """True for a (possibly ``{"state_dict": …}``-wrapped, ``module.``-prefixed) Apple CLIP dict."""
    return any(k.startswith(("image_encoder.", "text_encoder.")) for k in normalize_state_dict(state_dict))


def apple_clip_from_torch(state_dict: Mapping[str, Any], variant: str) -> Dict[str, Any]:
    """Apple ``mobileclip`` CLIP state_dict → ``{"image", "text", "logit_scale", "inference"}``.

    ``image``/``text`` are Flax variables (``{"params", "batch_stats"}``) for
    ``APPLE_VARIANTS[variant].image_module(inference_mode=…)`` / ``.text_module(…)``;
    ``inference`` says whether the dict was reparameterized (Apple's ``reparameterize_model``;
    MobileCLIP-S0 only). Loading is strict: missing, unexpected and mis-shaped keys raise
    :class:`StateDictMismatchError` naming them. ``logit_scale`` is a float (pre-``exp``).
    """
    sd = normalize_state_dict(state_dict)
    stray = [k for k in sd if not k.startswith((IMAGE_PREFIX, TEXT_PREFIX)) and k != "logit_scale"]
    if stray or "logit_scale" not in sd:
        raise StateDictMismatchError(
            f"state_dict does not match the Apple {variant} layout:"
            + (f"\n  unexpected keys ({len(stray)}):\n    " + "\n    ".join(stray[:10]) if stray else "")
            + ("" if "logit_scale" in sd else "\n  missing keys (1):\n    logit_scale"))
    if sd["logit_scale"].size != 1:
        raise StateDictMismatchError(f"logit_scale: got shape {sd['logit_scale'].shape}, expected a scalar")
    return {"image": apple_image_from_torch(sd, variant), "text": apple_text_from_torch(sd, variant),
            "logit_scale": float(sd["logit_scale"].reshape(())),
            "inference": _is_reparameterized(sd, IMAGE_PREFIX) or _is_reparameterized(sd, TEXT_PREFIX)}


def _has_reparam_conv(tree: Mapping) -> bool:
    return any(k == "reparam_conv" or (isinstance(c, Mapping) and _has_reparam_conv(c)) for k, c in tree.items())


def _tower_to_torch(variables: Mapping, table, prefix: str, what: str) -> Dict[str, np.ndarray]:
    out = variables_to_state_dict(variables, table, prefix=prefix, what=what)
    for e in table:
        if e.torch_key.endswith(POS_SUFFIX):
            key = prefix + e.torch_key
            out[key] = out[key].reshape((1, 1) + out[key].shape[-2:])
    return out


def apple_clip_to_torch(image_variables: Mapping[str, Any], text_variables: Mapping[str, Any],
                        logit_scale: float, variant: str) -> Dict[str, np.ndarray]:
    """Flax towers → Apple ``mobileclip`` CLIP state_dict (numpy), loadable with ``strict=True``.

    Train-form variables give the train-form dict that Apple's ``CLIP(cfg)`` loads; variables
    folded with :func:`~mobileclip2_jax.models.reparam.reparameterize` give the dict of
    ``reparameterize_model(CLIP(cfg))`` (form detected per tower). Raises ``ValueError`` if
    the image head has a nonzero bias: Apple's ``proj`` has none, so the model would change.
    """
    v = get_apple_variant(variant)
    image = jax.tree.map(np.asarray, dict(image_variables))
    text = jax.tree.map(np.asarray, dict(text_variables))
    _, _, head = _image_spec(v, False)
    params = dict(image["params"])
    head_params = dict(params[head])
    bias = head_params.pop("bias", None)
    if bias is not None and np.any(bias != 0):
        raise ValueError(f"{variant}: the image head bias is nonzero (max |b| = {np.abs(bias).max():.3g}) but "
                         f"Apple's projection ({'classifier' if head == 'head' else 'head'}.proj) has no bias; "
                         f"this model cannot be exported to the Apple layout without changing its outputs "
                         f"(export to the open_clip/timm layout instead)")
    params[head] = head_params
    image["params"] = params
    image_inf = _has_reparam_conv(image["params"])
    text_inf = _has_reparam_conv(text["params"])
    out = {"logit_scale": np.asarray(logit_scale, np.float32).reshape(())}
    out.update(_tower_to_torch(image, _image_spec(v, image_inf)[0], IMAGE_PREFIX, f"{variant} image tower {v.image}"))
    out.update(_tower_to_torch(text, _text_spec(v, text_inf)[0], TEXT_PREFIX, f"{variant} text tower {v.text}"))
    return out
