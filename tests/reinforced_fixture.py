"""Small, faithful reinforced records built from real COCO photos (``training_and_data.md`` §9.6).

No public DataCompDR/DFNDR shard exists to test against, so tests build records with the real
layout from real data: COCO photos (bytes exactly as stored, so ``sha256`` and crop boxes refer to
the file), the first human caption as GT, the next ``n_syn`` captions of the same image as
"synthetic" ones, augmentations sampled as the released generator does (for the real image size)
and random per-teacher L2-normalized teacher embeddings, concatenated in teacher order.

Import from tests as ``from reinforced_fixture import build_coco_records`` (pytest's default
``prepend`` import mode puts ``tests/`` on ``sys.path``, as for ``from conftest import ...``).
"""
from __future__ import annotations

import hashlib
import io
import pathlib
from typing import List, Sequence, Tuple

import numpy as np
from PIL import Image

from mobileclip2_jax.data.aug_sampling import AugSamplingConfig, sample_aug_params_list
from mobileclip2_jax.data.records import DatasetMetadata, ReinforcedRecord, Teacher
from mobileclip2_jax.data.sources import CocoCaptionsSource

DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
COCO_DIR = DATA / "coco_mini"
COCO_JSON = COCO_DIR / "annotations" / "captions_train2017.json"
COCO_IMAGES = COCO_DIR / "train2017"

TEACHER_NAMES = ("test-teacher-a", "test-teacher-b", "test-teacher-c", "test-teacher-d")
TEACHER_SCALES = (70.0, 60.0, 50.0, 40.0)  # DFNDR scripts pass 70 and 60 for their two teachers
SYN_KEYS = {"datacompdr": "syn_text", "dfndr": "syn_text_coco"}


def coco_source() -> CocoCaptionsSource:
    return CocoCaptionsSource(COCO_JSON, COCO_IMAGES)


def unit_blocks(rng: np.random.Generator, rows: int, dims: Sequence[int]) -> np.ndarray:
    """``[rows, sum(dims)]`` float32: each teacher block L2-normalized by itself, not the whole."""
    blocks = []
    for d in dims:
        x = rng.standard_normal((rows, d)).astype(np.float32)
        blocks.append(x / np.linalg.norm(x, axis=1, keepdims=True))
    return np.concatenate(blocks, axis=1).astype(np.float32)


def build_coco_records(n_images: int = 8, n_aug: int = 3, teacher_dims: Tuple[int, ...] = (8, 8),
                       layout: str = "datacompdr", n_syn: int = 2, seed: int = 0
                       ) -> Tuple[List[ReinforcedRecord], DatasetMetadata]:
    """``n_images`` records from ``shared/data/coco_mini`` plus their :class:`DatasetMetadata`.

    ``layout="datacompdr"``: ``syn_text`` + ``text_emb [1 + n_syn, D]`` (GT row, then syn rows).
    ``layout="dfndr"``: ``syn_text_coco`` + ``text_emb [1, D]`` and ``syn_text_embs
    {"syn_text_coco": [n_syn, D]}`` (written as member ``syn_text_coco_emb``).
    Deterministic in ``seed``; every record passes ``record.validate(metadata)``.
    """
    if layout not in SYN_KEYS:
        raise ValueError(f"layout must be one of {sorted(SYN_KEYS)}; got {layout!r}")
    if not 1 <= len(teacher_dims) <= len(TEACHER_NAMES):
        raise ValueError(f"teacher_dims must name 1..{len(TEACHER_NAMES)} teachers; "
                         f"got {teacher_dims!r}")
    source = coco_source()
    if not 1 <= n_images <= len(source):
        raise ValueError(f"n_images must be in 1..{len(source)} (coco_mini); got {n_images}")
    if not 1 <= n_syn <= 4:  # every released layout has synthetic captions
        raise ValueError(f"n_syn must be in 1..4 (COCO has 5 captions per image); got {n_syn}")
    teachers = tuple(Teacher(name, int(d), scale) for name, d, scale
                     in zip(TEACHER_NAMES, teacher_dims, TEACHER_SCALES))
    config = AugSamplingConfig()
    rng = np.random.default_rng(seed)
    syn_key = SYN_KEYS[layout]
    records = []
    for i in range(n_images):
        item = source[i]
        if len(item.captions) < 1 + n_syn:
            raise ValueError(f"{COCO_JSON}: image {item.key} has {len(item.captions)} captions; "
                             f"{1 + n_syn} needed")
        with Image.open(io.BytesIO(item.image)) as im:
            width, height = im.size  # header only: the size the crop boxes refer to
        syn = item.captions[1:1 + n_syn]
        image_emb = unit_blocks(rng, n_aug, teacher_dims)
        if layout == "datacompdr":
            text_emb, syn_embs = unit_blocks(rng, 1 + n_syn, teacher_dims), {}
        else:
            text_emb = unit_blocks(rng, 1, teacher_dims)
            syn_embs = {syn_key: unit_blocks(rng, n_syn, teacher_dims)}
        records.append(ReinforcedRecord(
            key=item.key, captions=[item.captions[0]], syn_texts={syn_key: syn},
            param_aug=sample_aug_params_list(rng, width, height, n_aug, config),
            image_emb=image_emb, text_emb=text_emb, syn_text_embs=syn_embs,
            image=item.image, image_ext=item.image_ext,
            extra={"uid": item.key, "sha256": hashlib.sha256(item.image).hexdigest()},
            url=item.extra.get("coco_url")))
    metadata = DatasetMetadata(
        teachers=teachers, text_emb_layout=layout, embedding_format="npz",
        augmentation=config.to_dict(),
        source={"name": "coco_mini", "description": "MS-COCO 2017 sample (shared/data/coco_mini): "
                "first human caption as GT, the next ones as synthetic; random teacher embeddings",
                "annotations": "coco_mini/annotations/captions_train2017.json", "seed": seed},
        num_samples=n_images)
    for r in records:
        r.validate(metadata)
    return records, metadata
