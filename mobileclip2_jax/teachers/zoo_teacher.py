"""A teacher from this project's zoo (any of the 13 variants), run under ``jax.jit``.

Weights come from an Orbax checkpoint written by ``model.save(dir)`` / the converter
(``create_model(name, pretrained=dir)``), or an open_clip ``.pt``/``.safetensors`` file of
the same variant. The model is reparameterized (the exact inference form: fewer, fused
convolutions) and its encoders are jitted once for a fixed batch that is sharded over this
host's local devices. Hosts generate different shards at their own pace, so the computation is
deliberately *per host* (a mesh of ``jax.local_devices()``), never a cross-host SPMD program.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Dict, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mobileclip2_jax.teachers.base import check_embeddings, run_fixed_batches


class ZooTeacher:
    """``name``: a zoo variant (e.g. ``"MobileCLIP2-S4"``); ``checkpoint``: its weights.

    ``checkpoint=None`` builds a random-init model only with ``allow_random_init=True`` (smoke
    tests; recorded as such in the metadata) — a dataset distilled from noise must be a choice.
    ``image_size`` overrides the variant's preprocessing size; ``label`` names the teacher in the
    metadata (default: the variant name).
    """

    def __init__(self, name: str, checkpoint: Optional[str] = None, *, image_size: Optional[int] = None,
                 batch_size: int = 64, label: Optional[str] = None, logit_scale: Optional[float] = None,
                 allow_random_init: bool = False, seed: int = 0, reparameterize: bool = True):
        from mobileclip2_jax.factory import create_model, get_tokenizer
        from mobileclip2_jax.models.clip import CLIP
        if checkpoint is None and not allow_random_init:
            raise ValueError(f"zoo teacher {name!r}: no checkpoint given. Pass the Orbax directory "
                             f"written by model.save(dir), or an open_clip .pt/.safetensors file of the variant; "
                             f"allow_random_init=True builds random weights for smoke tests only")
        model = create_model(name, pretrained=checkpoint, image_size=image_size, seed=seed)
        if reparameterize:
            model = model.reparameterize()
        self.model_name = model.name
        self.checkpoint = checkpoint
        self.name = label or model.name
        self.dim = int(model.spec.embed_dim)
        self.logit_scale = float(logit_scale) if logit_scale is not None else model.logit_scale
        self.source = str(checkpoint) if checkpoint else f"random-init (seed {seed})"
        preprocess = model.spec.preprocess
        self.preprocess = dataclasses.replace(preprocess, image_size=int(image_size)) if image_size else preprocess
        self.tokenizer = get_tokenizer(model.name)
        devices = jax.local_devices()
        self.batch_size = -(-int(batch_size) // len(devices)) * len(devices)
        mesh = Mesh(np.array(devices), ("data",))
        rows, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
        module = model.module

        def encoder(method, variables):
            fn = jax.jit(functools.partial(module.apply, method=method, normalize=True),
                         in_shardings=(replicated, rows), out_shardings=rows)
            variables = jax.device_put(variables, replicated)
            return lambda x: np.asarray(fn(variables, jax.device_put(x, rows)))

        self._encode_image = encoder(CLIP.encode_image, model._tower_variables("visual"))
        self._encode_text = encoder(CLIP.encode_text, model._tower_variables("text"))
        self._text_pad = self.tokenizer([""])[0]
        self.model = model

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images, np.float32)
        size = self.preprocess.image_size
        if images.ndim != 4 or images.shape[1:] != (size, size, 3):
            raise ValueError(f"teacher {self.name!r}: expected views of shape (N, {size}, {size}, 3); "
                             f"got {images.shape}")
        pad = np.zeros(images.shape[1:], np.float32)
        out = run_fixed_batches(self._encode_image, images, self.batch_size, pad)
        return check_embeddings(out, len(images), self.dim, f"teacher {self.name!r} images")

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        ids = np.asarray(self.tokenizer(list(texts)), np.int32)
        out = run_fixed_batches(self._encode_text, ids, self.batch_size, self._text_pad)
        return check_embeddings(out, len(ids), self.dim, f"teacher {self.name!r} texts")

    def describe(self) -> Dict[str, Any]:
        p = self.preprocess
        return {"kind": "zoo", "model": self.model_name, "checkpoint": self.checkpoint,
                "image_size": p.image_size, "mean": list(p.mean), "std": list(p.std),
                "tokenizer": "clip_bpe", "context_length": int(self.model.context_length),
                "form": "reparameterized" if self.model.inference_mode else "train"}
