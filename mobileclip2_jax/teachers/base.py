"""The teacher interface of the dataset generator, and fixed-shape batching.

A teacher is anything with a name, an embedding width, a default logit scale, the
preprocessing its image tower expects, and two encoders. The generator replays each stored
augmentation *at the teacher's own* resolution and normalization (a ViT-L-14 teacher sees
224 px OpenAI-normalized pixels while the student later replays the same crop at 256 px raw
pixels), so the preprocessing belongs to the teacher, not to the dataset.

Encoders run on fixed-size batches: under ``jax.jit`` a ragged last batch would compile a new
executable per shard tail; under PyTorch it would not matter, but one helper serves both.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Protocol, Sequence, runtime_checkable

import numpy as np

from mobileclip2_jax.data.preprocess import PreprocessConfig


@runtime_checkable
class TeacherModel(Protocol):
    """What :func:`mobileclip2_jax.data.reinforce.generate` needs from a teacher."""

    name: str            # recorded in the dataset metadata; unique within an ensemble
    dim: int             # width of its embedding block
    logit_scale: float   # default scale for distillation (its own learned exp(logit_scale))
    source: str          # where its weights came from
    preprocess: PreprocessConfig  # image size, mean/std the image tower expects

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        """``(N, S, S, 3)`` float32 normalized views → ``(N, dim)`` L2-normalized float32."""

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """``N`` caption strings → ``(N, dim)`` L2-normalized float32."""

    def describe(self) -> Dict[str, Any]:
        """JSON-ready facts for the metadata and the run plan (kind, model, checkpoint, …)."""


def run_fixed_batches(fn: Callable[[np.ndarray], np.ndarray], inputs: np.ndarray,
                      batch_size: int, pad_row: np.ndarray) -> np.ndarray:
    """``fn`` over ``inputs`` in batches of exactly ``batch_size`` rows (the tail padded with
    ``pad_row``, whose outputs are dropped); returns float32 ``(len(inputs), D)``."""
    n = len(inputs)
    if n == 0:
        raise ValueError("run_fixed_batches: no inputs")
    out = []
    for start in range(0, n, batch_size):
        chunk = inputs[start:start + batch_size]
        real = len(chunk)
        if real < batch_size:
            pad = np.broadcast_to(pad_row, (batch_size - real,) + pad_row.shape).astype(chunk.dtype)
            chunk = np.concatenate([chunk, pad])
        out.append(np.asarray(fn(chunk), np.float32)[:real])
    return np.concatenate(out)


def check_embeddings(emb: np.ndarray, n: int, dim: int, what: str) -> np.ndarray:
    """A teacher's output must be ``(n, dim)``, finite and unit-norm; a broken checkpoint
    (NaN weights, wrong head) is caught here, before a shard of garbage is written."""
    emb = np.asarray(emb, np.float32)
    if emb.shape != (n, dim):
        raise ValueError(f"{what}: expected embeddings of shape {(n, dim)}, got {emb.shape}")
    if not np.isfinite(emb).all():
        raise ValueError(f"{what}: non-finite embeddings (is the checkpoint broken?)")
    norms = np.linalg.norm(emb, axis=1)
    if np.abs(norms - 1).max() > 1e-3:
        raise ValueError(f"{what}: embeddings are not L2-normalized (norms {norms.min():.4f}–"
                         f"{norms.max():.4f})")
    return emb
