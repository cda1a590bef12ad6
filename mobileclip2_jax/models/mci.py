"""MCi0–MCi4 image towers (FastViT-MCi), Flax Linen port of timm's ``fastvit_mci*``.

Each module exists in two forms selected by ``inference_mode``:
- train form (``False``): the multi-branch MobileOne blocks, RepMixer, RepCPE and large-kernel
  convs with their BatchNorms, exactly the parameter set of timm's training-time model;
- inference form (``True``): every reparameterizable module is one conv with bias, the form
  timm's ``reparameterize_model`` produces. Get its variables from the train form's with the
  pure function :func:`mobileclip2_jax.models.reparam.reparameterize`.

Module and parameter names mirror timm's (``stem_0`` ≙ ``stem.0``, ``conv_kxk_0`` ≙
``conv_kxk.0``) so that the explicit key tables in ``mobileclip2_jax.convert.mci_layout`` read
like the PyTorch state_dict. Images are NHWC.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Tuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from mobileclip2_jax.models.layers import (BatchNorm, Conv2d, ConvNorm, Dense, DropPath, LayerNorm,
                                           SqueezeExcite, gelu, layer_scale_param, trunc_normal_02)

Dtype = Any


@dataclasses.dataclass(frozen=True)
class MCiConfig:
    """Architecture of one MCi tower (timm ``FastVit`` arguments that MobileCLIP uses)."""
    name: str
    layers: Tuple[int, ...]
    embed_dims: Tuple[int, ...]
    mlp_ratio: float
    token_mixers: Tuple[str, ...]          # "repmixer" | "attention" per stage
    pos_embs: Tuple[bool, ...]             # RepCPE 7×7 at the start of the stage
    se_downsamples: Tuple[bool, ...]
    attn_norm: str                         # "batchnorm" (MCi0–2) | "layernorm" (MCi3/4)
    stem_use_scale_branch: bool
    num_classes: int                       # the CLIP embedding dim (timm head.fc)
    image_size: int = 256
    layer_scale_init_value: float = 1e-5
    cls_ratio: float = 2.0
    repmixer_kernel_size: int = 3
    down_patch_size: int = 7
    down_stride: int = 2

    @property
    def num_stages(self) -> int:
        return len(self.layers)

    @property
    def total_stride(self) -> int:
        """Input pixels per final feature-map cell (4 from the stem, ×2 per downsample)."""
        return 4 * 2 ** (self.num_stages - 1)

    def downsamples(self) -> Tuple[bool, ...]:
        """timm adds a PatchEmbed iff ``downsamples[i] or prev_dim != dim``; stage 0 has none."""
        out, prev = [], self.embed_dims[0]
        for i, dim in enumerate(self.embed_dims):
            out.append(i > 0 or prev != dim)
            prev = dim
        return tuple(out)


_MCI012 = dict(mlp_ratio=3.0, token_mixers=("repmixer",) * 3 + ("attention",),
               pos_embs=(False, False, False, True), se_downsamples=(False, False, True, True),
               attn_norm="batchnorm", stem_use_scale_branch=True, num_classes=512)
_MCI34 = dict(mlp_ratio=4.0, token_mixers=("repmixer",) * 3 + ("attention",) * 2,
              pos_embs=(False, False, False, True, True), se_downsamples=(False,) * 5,
              attn_norm="layernorm", stem_use_scale_branch=False, num_classes=768)

MCI_CONFIGS = {
    "mci0": MCiConfig("mci0", (2, 6, 10, 2), (64, 128, 256, 512), **_MCI012),
    "mci1": MCiConfig("mci1", (4, 12, 20, 4), (64, 128, 256, 512), **_MCI012),
    "mci2": MCiConfig("mci2", (4, 12, 24, 4), (80, 160, 320, 640), **_MCI012),
    "mci3": MCiConfig("mci3", (2, 12, 24, 4, 2), (96, 192, 384, 768, 1536), **_MCI34),
    "mci4": MCiConfig("mci4", (2, 12, 24, 4, 4), (128, 256, 512, 1024, 2048), **_MCI34),
}


def get_mci_config(name: str, **overrides: Any) -> MCiConfig:
    """Config by name (``mci0``…``mci4``, or timm's ``fastvit_mci0``…), with field overrides."""
    key = name.lower().removeprefix("fastvit_")
    if key not in MCI_CONFIGS:
        raise ValueError(f"unknown MCi variant {name!r}; expected one of {sorted(MCI_CONFIGS)}")
    return dataclasses.replace(MCI_CONFIGS[key], **overrides)


class MobileOneBlock(nn.Module):
    """timm ``MobileOneBlock``: Σ BN(conv_kxk) + BN(conv_scale 1×1) + BN(x) → SE → act."""
    features: int
    kernel_size: int
    stride: int = 1
    groups: int = 1
    use_se: bool = False
    use_act: bool = True
    use_scale_branch: bool = True
    num_conv_branches: int = 1
    inference_mode: bool = False
    depthwise_impl: str = "auto"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        k, s, g = self.kernel_size, self.stride, self.groups
        conv = dict(groups=g, depthwise_impl=self.depthwise_impl, dtype=self.dtype)
        if self.inference_mode:
            y = Conv2d(self.features, k, s, use_bias=True, name="reparam_conv", **conv)(x)
        else:
            y = 0.0
            if self.features == x.shape[-1] and s == 1:
                y = y + BatchNorm(name="identity")(x, train).astype(self.dtype)
            if k > 1 and self.use_scale_branch:
                y = y + ConvNorm(self.features, 1, s, name="conv_scale", **conv)(x, train)
            for i in range(self.num_conv_branches):
                y = y + ConvNorm(self.features, k, s, name=f"conv_kxk_{i}", **conv)(x, train)
        if self.use_se:
            y = SqueezeExcite(rd_divisor=1, dtype=self.dtype, name="se")(y)
        return gelu(y) if self.use_act else y


class ReparamLargeKernelConv(nn.Module):
    """timm ``ReparamLargeKernelConv``: BN(conv k×k) + BN(conv 3×3), groups=in, → SE → GELU."""
    features: int
    kernel_size: int
    stride: int
    small_kernel: int = 3
    use_se: bool = False
    inference_mode: bool = False
    depthwise_impl: str = "auto"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        conv = dict(groups=x.shape[-1], depthwise_impl=self.depthwise_impl, dtype=self.dtype)
        if self.inference_mode:
            y = Conv2d(self.features, self.kernel_size, self.stride, use_bias=True,
                       name="reparam_conv", **conv)(x)
        else:
            y = ConvNorm(self.features, self.kernel_size, self.stride, name="large_conv", **conv)(x, train)
            y = y + ConvNorm(self.features, self.small_kernel, self.stride, name="small_conv",
                             **conv)(x, train)
        if self.use_se:
            y = SqueezeExcite(rd_ratio=0.25, dtype=self.dtype, name="se")(y)
        return gelu(y)  # MCi sets lkc_use_act=True


class PatchEmbed(nn.Module):
    """Stage downsample: large-kernel depthwise stride-2 conv, then a 1×1 MobileOne block."""
    features: int
    patch_size: int
    stride: int
    use_se: bool
    inference_mode: bool = False
    depthwise_impl: str = "auto"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(inference_mode=self.inference_mode, depthwise_impl=self.depthwise_impl,
                  dtype=self.dtype)
        x = ReparamLargeKernelConv(self.features, self.patch_size, self.stride, use_se=self.use_se,
                                   name="proj_0", **kw)(x, train)
        return MobileOneBlock(self.features, 1, name="proj_1", **kw)(x, train)


class RepMixer(nn.Module):
    """timm ``RepMixer``: ``x + ls ⊙ (mixer(x) − norm(x))`` with depthwise 3×3 MobileOne blocks."""
    kernel_size: int = 3
    layer_scale_init_value: float = 1e-5
    inference_mode: bool = False
    depthwise_impl: str = "auto"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        c = x.shape[-1]
        kw = dict(groups=c, use_act=False, depthwise_impl=self.depthwise_impl, dtype=self.dtype)
        if self.inference_mode:
            return Conv2d(c, self.kernel_size, 1, groups=c, use_bias=True, name="reparam_conv",
                          depthwise_impl=self.depthwise_impl, dtype=self.dtype)(x)
        mixer = MobileOneBlock(c, self.kernel_size, name="mixer", **kw)(x, train)
        norm = MobileOneBlock(c, self.kernel_size, use_scale_branch=False, num_conv_branches=0,
                              name="norm", **kw)(x, train)
        gamma = layer_scale_param(self, "layer_scale", c, self.layer_scale_init_value)
        return x + gamma.astype(self.dtype) * (mixer - norm)


class ConvMlp(nn.Module):
    """timm ``ConvMlp``: dw 7×7 conv + BN → 1×1 (C→hidden) → GELU → 1×1 (hidden→C)."""
    hidden: int
    depthwise_impl: str = "auto"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        c = x.shape[-1]
        x = ConvNorm(c, 7, 1, groups=c, kernel_init=trunc_normal_02,
                     depthwise_impl=self.depthwise_impl, dtype=self.dtype, name="conv")(x, train)
        x = Conv2d(self.hidden, 1, use_bias=True, kernel_init=trunc_normal_02,
                   bias_init=nn.initializers.zeros, dtype=self.dtype, name="fc1")(x)
        x = gelu(x)
        return Conv2d(c, 1, use_bias=True, kernel_init=trunc_normal_02,
                      bias_init=nn.initializers.zeros, dtype=self.dtype, name="fc2")(x)


class RepMixerBlock(nn.Module):
    """timm ``RepMixerBlock``: token mixer, then ``x + drop_path(ls ⊙ mlp(x))``."""
    mlp_ratio: float
    kernel_size: int = 3
    drop_path: float = 0.0
    layer_scale_init_value: float = 1e-5
    inference_mode: bool = False
    depthwise_impl: str = "auto"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        c = x.shape[-1]
        x = RepMixer(self.kernel_size, self.layer_scale_init_value, self.inference_mode,
                     self.depthwise_impl, self.dtype, name="token_mixer")(x, train)
        y = ConvMlp(int(c * self.mlp_ratio), self.depthwise_impl, self.dtype, name="mlp")(x, train)
        gamma = layer_scale_param(self, "layer_scale", c, self.layer_scale_init_value)
        return x + DropPath(self.drop_path)(gamma.astype(self.dtype) * y, train)


class Attention(nn.Module):
    """timm FastViT ``Attention``: head_dim 32, qkv without bias, proj with bias, no mask."""
    head_dim: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        heads = c // self.head_dim
        tokens = x.reshape(b, h * w, c)  # row-major, same order as torch flatten(2).transpose
        qkv = Dense(3 * c, use_bias=False, dtype=self.dtype, name="qkv")(tokens)
        q, k, v = jnp.moveaxis(qkv.reshape(b, h * w, 3, heads, self.head_dim), 2, 0)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q * self.head_dim ** -0.5, k)
        probs = jax.nn.softmax(logits.astype(jnp.promote_types(self.dtype, jnp.float32)),
                               axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, h * w, c)
        out = Dense(c, dtype=self.dtype, name="proj")(out)
        return out.reshape(b, h, w, c)


class AttentionBlock(nn.Module):
    """timm ``AttentionBlock``: ``x + ls1 ⊙ attn(norm(x))``, then ``x + ls2 ⊙ mlp(x)``."""
    mlp_ratio: float
    norm: str = "batchnorm"
    drop_path: float = 0.0
    layer_scale_init_value: float = 1e-5
    depthwise_impl: str = "auto"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        c = x.shape[-1]
        if self.norm == "batchnorm":
            y = BatchNorm(name="norm")(x, train)
        else:
            y = LayerNorm(epsilon=1e-5, name="norm")(x)
        y = Attention(dtype=self.dtype, name="token_mixer")(y)
        g1 = layer_scale_param(self, "layer_scale_1", c, self.layer_scale_init_value)
        x = x + DropPath(self.drop_path)(g1.astype(self.dtype) * y, train)
        y = ConvMlp(int(c * self.mlp_ratio), self.depthwise_impl, self.dtype, name="mlp")(x, train)
        g2 = layer_scale_param(self, "layer_scale_2", c, self.layer_scale_init_value)
        return x + DropPath(self.drop_path)(g2.astype(self.dtype) * y, train)


class RepCPE(nn.Module):
    """timm ``RepConditionalPosEnc``: ``x + dwconv7×7(x)`` (with bias); one conv when fused."""
    kernel_size: int = 7
    inference_mode: bool = False
    depthwise_impl: str = "auto"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        conv = dict(groups=c, use_bias=True, depthwise_impl=self.depthwise_impl, dtype=self.dtype)
        if self.inference_mode:
            return Conv2d(c, self.kernel_size, name="reparam_conv", **conv)(x)
        return Conv2d(c, self.kernel_size, name="pos_enc", **conv)(x) + x


def stage_drop_path_rates(rate: float, layers: Tuple[int, ...]) -> Tuple[Tuple[float, ...], ...]:
    """timm ``calculate_drop_path_rates(stagewise=True)``: linear over blocks, split per stage."""
    total = sum(layers)
    flat = [rate * i / (total - 1) if total > 1 else 0.0 for i in range(total)]
    out, start = [], 0
    for depth in layers:
        out.append(tuple(flat[start:start + depth]))
        start += depth
    return tuple(out)


class MCi(nn.Module):
    """An MCi image tower: stem → stages → final_conv (SE) → global average pool → ``head.fc``.

    Input: float images ``(B, H, W, 3)`` already normalized as the variant's preprocessing
    says. Output: ``(B, num_classes)`` un-normalized image embeddings (what open_clip's
    ``model.visual(x)`` returns for MobileCLIP2).
    """
    config: MCiConfig
    inference_mode: bool = False
    drop_path_rate: float = 0.0
    depthwise_impl: str = "auto"
    dtype: Dtype = jnp.float32

    def check_input(self, x: jax.Array) -> None:
        cfg = self.config
        expected = f"(batch, height, width, 3) NHWC with height, width >= {cfg.total_stride}"
        if x.ndim != 4:
            raise ValueError(f"{cfg.name}: expected images of shape {expected}; got rank {x.ndim} "
                             f"array of shape {tuple(x.shape)}")
        if x.shape[-1] != 3:
            hint = (" (this looks like NCHW: transpose to NHWC)" if x.shape[1] == 3 else
                    " (grayscale/RGBA images must be converted to RGB)" if x.shape[-1] in (1, 4) else "")
            raise ValueError(f"{cfg.name}: expected images of shape {expected}; got {x.shape[-1]} "
                             f"channels in shape {tuple(x.shape)}{hint}")
        if min(x.shape[1:3]) < cfg.total_stride:
            raise ValueError(f"{cfg.name}: expected images of shape {expected}; got spatial size "
                             f"{tuple(x.shape[1:3])}, below the tower's total stride "
                             f"{cfg.total_stride}")

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        self.check_input(x)
        cfg = self.config
        kw = dict(inference_mode=self.inference_mode, depthwise_impl=self.depthwise_impl,
                  dtype=self.dtype)
        c0 = cfg.embed_dims[0]
        sb = cfg.stem_use_scale_branch
        x = MobileOneBlock(c0, 3, 2, use_scale_branch=sb, name="stem_0", **kw)(x, train)
        x = MobileOneBlock(c0, 3, 2, groups=c0, use_scale_branch=sb, name="stem_1", **kw)(x, train)
        x = MobileOneBlock(c0, 1, 1, use_scale_branch=sb, name="stem_2", **kw)(x, train)
        dpr = stage_drop_path_rates(self.drop_path_rate, cfg.layers)
        for i in range(cfg.num_stages):
            x = MCiStage(cfg, i, dpr[i], name=f"stages_{i}", **kw)(x, train)
        final = int(cfg.embed_dims[-1] * cfg.cls_ratio)
        x = MobileOneBlock(final, 3, 1, groups=cfg.embed_dims[-1], use_se=True, name="final_conv",
                           **kw)(x, train)
        x = jnp.mean(x.astype(jnp.promote_types(x.dtype, jnp.float32)), axis=(1, 2))
        return Dense(cfg.num_classes, dtype=self.dtype, name="head_fc")(x)


class MCiStage(nn.Module):
    """timm ``FastVitStage``: downsample (PatchEmbed) → RepCPE → blocks."""
    config: MCiConfig
    index: int
    drop_path_rates: Tuple[float, ...]
    inference_mode: bool = False
    depthwise_impl: str = "auto"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        cfg, i = self.config, self.index
        dim = cfg.embed_dims[i]
        kw = dict(inference_mode=self.inference_mode, depthwise_impl=self.depthwise_impl,
                  dtype=self.dtype)
        if cfg.downsamples()[i]:
            x = PatchEmbed(dim, cfg.down_patch_size, cfg.down_stride, cfg.se_downsamples[i],
                           name="downsample", **kw)(x, train)
        if cfg.pos_embs[i]:
            x = RepCPE(7, name="pos_emb", **kw)(x)
        for j in range(cfg.layers[i]):
            if cfg.token_mixers[i] == "repmixer":
                x = RepMixerBlock(cfg.mlp_ratio, cfg.repmixer_kernel_size, self.drop_path_rates[j],
                                  cfg.layer_scale_init_value, name=f"blocks_{j}", **kw)(x, train)
            elif cfg.token_mixers[i] == "attention":
                x = AttentionBlock(cfg.mlp_ratio, cfg.attn_norm, self.drop_path_rates[j],
                                   cfg.layer_scale_init_value, self.depthwise_impl, self.dtype,
                                   name=f"blocks_{j}")(x, train)
            else:
                raise ValueError(f"{cfg.name}: unknown token mixer {cfg.token_mixers[i]!r}")
        return x
