"""Sampling *new* augmentation parameters in DataCompDR's stored form, numpy/PIL only.

Why this exists: building a reinforced dataset (``training_and_data.md`` §4.3, §4.7) draws
``N_aug`` random views per image, runs the teachers on each and stores the views' parameters
(``paug.json``) so that training can replay exactly those views (:mod:`.augment`). The released
generator draws them with torchvision's ``RandomResizedCrop`` → ``RandAugment`` on torch's global
RNG. Here they come from a ``numpy.random.Generator`` instead: a generator must be reproducible
per sample and per shard (idempotent re-runs, elastic workers), which a process-global torch
stream is not. What must match torchvision is the **distribution and the value set**, so that a
dataset built here is interchangeable with DataCompDR:

* crop box: ``RandomResizedCrop.get_params`` step by step — 10 attempts of (area ~ U(scale)·A,
  aspect ~ exp(U(log ratio))), ``w = round(√(a·r))``, ``h = round(√(a/r))``, accept when
  ``0 < w ≤ W`` and ``0 < h ≤ H`` with a uniform top-left; otherwise the central fallback crop.
  The uniforms are rounded to float32 as torch's ``torch.empty(1).uniform_`` (float32) is;
* RandAugment (``training/dr/transforms.py:RandAugment``, a torchvision subclass): skipped with
  probability ``1 − p`` (stored as ``null``); else ``num_ops`` ops, each uniform over the 14 ops,
  magnitude = ``_augmentation_space(bins, (size, size))[op][magnitude]`` — computed for the
  *crop output* size because RandAugment runs after the crop — negated with probability ½ for
  signed ops. The table reproduces torch's float32 ``linspace`` bit for bit (torch's CPU kernel
  evaluates ``start + step·i`` with a fused multiply-add), so stored values are e.g.
  ``0.09000000357627869``, ``30.45317268371582``, ``178.5``, ``7.0``, exactly as in DataCompDR.

Stored form of one augmentation (§1.3, §9.3): ``[[i, j, h, w], [[op, mag], [op, mag]]]``, plain
Python ints/floats (JSON-ready); decoded and replayed by :func:`.augment.decode_aug_params`.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from mobileclip2_jax.data.augment import OP_NAMES

_F32 = np.float32
# Which RandAugment ops flip sign at random (torchvision ``_augmentation_space``'s ``signed``).
SIGNED_OPS: Tuple[str, ...] = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate",
                               "Brightness", "Color", "Contrast", "Sharpness")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")


# --------------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class AugSamplingConfig:
    """RandomResizedCrop → RandAugment parameters; defaults = every released DR dataset.

    The released config (``training/configs/datacompdr*.json``) sets only RRC ``size=224,
    interpolation="bicubic"`` and RandAugment ``p=1.0``; the rest are torchvision defaults,
    spelled out here so the dataset metadata records them. ``interpolation`` does not affect
    sampling; it records how the teacher's view was resized (replay may use another).
    """
    crop_size: int = 224
    scale: Tuple[float, float] = (0.08, 1.0)
    ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    num_ops: int = 2
    magnitude: int = 9
    num_magnitude_bins: int = 31
    randaugment_p: float = 1.0
    interpolation: str = "bicubic"

    def __post_init__(self):
        def bad(msg: str) -> ValueError:
            return ValueError(f"AugSamplingConfig: {msg}")

        for name in ("crop_size", "num_ops", "magnitude", "num_magnitude_bins"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise bad(f"{name} must be an int; got {v!r}")
            object.__setattr__(self, name, int(v))
        if self.crop_size <= 0:
            raise bad(f"crop_size must be positive; got {self.crop_size}")
        if self.num_ops < 0:
            raise bad(f"num_ops must be ≥ 0; got {self.num_ops}")
        if self.num_magnitude_bins < 2:  # linspace needs 2 points; posterize divides by bins-1
            raise bad(f"num_magnitude_bins must be ≥ 2; got {self.num_magnitude_bins}")
        if not 0 <= self.magnitude < self.num_magnitude_bins:
            raise bad(f"magnitude must be a bin index in 0..{self.num_magnitude_bins - 1}; "
                      f"got {self.magnitude}")
        for name in ("scale", "ratio"):
            pair = getattr(self, name)
            try:
                lo, hi = (float(x) for x in pair)
            except (TypeError, ValueError):
                raise bad(f"{name} must be a (min, max) pair of numbers; got {pair!r}") from None
            if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi):
                raise bad(f"{name} must be (min, max) with 0 < min ≤ max; got {pair!r}")
            object.__setattr__(self, name, (lo, hi))
        p = self.randaugment_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise bad(f"randaugment_p must be a probability in [0, 1]; got {p!r}")
        object.__setattr__(self, "randaugment_p", float(p))
        if self.interpolation not in INTERPOLATIONS:
            raise bad(f"interpolation must be one of {INTERPOLATIONS}; got {self.interpolation!r}")

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready dict in the reference's ``image_augmentation`` layout (for metadata).

        The keys are those of ``compose_from_config`` (``random_resized_crop``,
        ``rand_augment``), so the entry reads like the generator's ``config.json``, with every
        sampling-relevant default made explicit.
        """
        return {
            "random_resized_crop": {"size": self.crop_size, "scale": list(self.scale),
                                    "ratio": list(self.ratio),
                                    "interpolation": self.interpolation},
            "rand_augment": {"enable": True, "p": self.randaugment_p, "num_ops": self.num_ops,
                             "magnitude": self.magnitude,
                             "num_magnitude_bins": self.num_magnitude_bins},
            "stored_form": "[[i, j, h, w], [[op, mag], ...] | null]",
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "AugSamplingConfig":
        """Inverse of :meth:`to_dict`; also reads a reference config's ``image_augmentation``.

        Missing entries take torchvision's defaults, as the reference does. A disabled or absent
        ``rand_augment`` is only representable as ``p=0`` here (every entry stored as null).
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"augmentation config must be a mapping; got {type(d).__name__}")
        if "reinforce" in d:  # a whole generator config.json
            d = d["reinforce"].get("image_augmentation", {})
        rrc = d.get("random_resized_crop")
        if not isinstance(rrc, Mapping) or rrc.get("enable", True) is False:
            raise ValueError(f"augmentation config has no enabled 'random_resized_crop' entry "
                             f"(keys: {sorted(d)}); only RandomResizedCrop → RandAugment "
                             f"pipelines are supported")
        unsupported = [k for k in ("random_crop", "random_horizontal_flip", "random_erase",
                                   "mixup", "cutmix", "resize", "center_crop")
                       if isinstance(d.get(k), Mapping) and d[k].get("enable", True)]
        if unsupported:
            raise ValueError(f"augmentation config enables {unsupported}; this sampler only "
                             f"writes RandomResizedCrop → RandAugment params")
        ra = d.get("rand_augment") or {"enable": False}
        ra_on = ra.get("enable", True)
        size = rrc.get("size", 224)
        if isinstance(size, (list, tuple)):
            if len(size) != 2 or size[0] != size[1]:
                raise ValueError(f"random_resized_crop.size must be square; got {size!r}")
            size = size[0]
        return cls(crop_size=size, scale=tuple(rrc.get("scale", (0.08, 1.0))),
                   ratio=tuple(rrc.get("ratio", (3.0 / 4.0, 4.0 / 3.0))),
                   num_ops=ra.get("num_ops", 2), magnitude=ra.get("magnitude", 9),
                   num_magnitude_bins=ra.get("num_magnitude_bins", 31),
                   randaugment_p=float(ra.get("p", 1.0)) if ra_on else 0.0,
                   interpolation=rrc.get("interpolation", "bilinear"))


# ------------------------------------------------------------------------ magnitude table
def _linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps)`` (float32, CPU) bit for bit.

    torch's kernel computes ``step = (end − start) / (steps − 1)`` in float32, then the first half
    as ``start + step·i`` and the second as ``end − step·(steps − 1 − i)``, each rounded once
    (the compiler fuses the multiply-add). The product of a float32 and a small int is exact in
    float64, so doing the sum in float64 and rounding to float32 gives the same value.
    """
    s, e = _F32(start), _F32(end)
    step = (e - s) / _F32(steps - 1)
    half = steps // 2
    out = np.empty(steps, np.float32)
    for i in range(steps):
        if i < half:
            out[i] = _F32(np.float64(s) + np.float64(step) * i)
        else:
            out[i] = _F32(np.float64(e) - np.float64(step) * (steps - i - 1))
    return out


def augmentation_space(num_bins: int, image_size: Tuple[int, int]
                       ) -> Dict[str, Tuple[Optional[np.ndarray], bool]]:
    """torchvision ``RandAugment._augmentation_space(num_bins, (height, width))`` as float32 numpy.

    Ops whose torchvision magnitude is the 0-d ``tensor(0.0)`` map to ``None`` (their stored
    magnitude is always ``0.0``). Posterize is ``8 − round(float32(i) / ((bins − 1) / 4))``
    (round half to even, as ``Tensor.round``).
    """
    height, width = image_size
    posterize = 8 - np.round(np.arange(num_bins, dtype=np.float32)
                             / _F32((num_bins - 1) / 4.0)).astype(np.int32)
    return {
        "Identity": (None, False),
        "ShearX": (_linspace_f32(0.0, 0.3, num_bins), True),
        "ShearY": (_linspace_f32(0.0, 0.3, num_bins), True),
        "TranslateX": (_linspace_f32(0.0, 150.0 / 331.0 * width, num_bins), True),
        "TranslateY": (_linspace_f32(0.0, 150.0 / 331.0 * height, num_bins), True),
        "Rotate": (_linspace_f32(0.0, 30.0, num_bins), True),
        "Brightness": (_linspace_f32(0.0, 0.9, num_bins), True),
        "Color": (_linspace_f32(0.0, 0.9, num_bins), True),
        "Contrast": (_linspace_f32(0.0, 0.9, num_bins), True),
        "Sharpness": (_linspace_f32(0.0, 0.9, num_bins), True),
        "Posterize": (posterize, False),
        "Solarize": (_linspace_f32(255.0, 0.0, num_bins), False),
        "AutoContrast": (None, False),
        "Equalize": (None, False),
    }


@functools.lru_cache(maxsize=64)  # configs are frozen (hashable); the table is per config
def magnitude_table(config: AugSamplingConfig = AugSamplingConfig()
                    ) -> Tuple[Tuple[float, bool], ...]:
    """Per op index (:data:`.augment.OP_NAMES` order): (unsigned stored magnitude, signed).

    Magnitudes are Python floats of the float32 values, i.e. what
    ``float(magnitudes[m].item())`` gives in the reference and what ends up in ``paug.json``.
    """
    space = augmentation_space(config.num_magnitude_bins, (config.crop_size, config.crop_size))
    if tuple(space) != OP_NAMES:  # the stored index is the position in this dict
        raise AssertionError(f"op order {tuple(space)} ≠ augment.OP_NAMES {OP_NAMES}")
    return tuple((0.0 if mags is None else float(mags[config.magnitude]), signed)
                 for mags, signed in space.values())


# ------------------------------------------------------------------------------- sampling
def fallback_crop_box(image_width: int, image_height: int,
                      ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
                      ) -> Tuple[int, int, int, int]:
    """torchvision's central crop when 10 attempts fail: the largest in-ratio centred box."""
    in_ratio = float(image_width) / float(image_height)
    if in_ratio < min(ratio):
        w = image_width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = image_height
        w = int(round(h * max(ratio)))
    else:  # whole image
        w, h = image_width, image_height
    return (image_height - h) // 2, (image_width - w) // 2, h, w


def sample_crop_box(rng: np.random.Generator, image_width: int, image_height: int,
                    scale: Tuple[float, float] = (0.08, 1.0),
                    ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
                    ) -> Tuple[int, int, int, int]:
    """``RandomResizedCrop.get_params``: ``(top, left, height, width)`` in source pixels."""
    width, height = _check_size(image_width, image_height)
    area = height * width
    log_ratio = np.log(np.asarray(ratio, dtype=np.float32))  # float32, as torch.log(tensor)
    for _ in range(10):
        target_area = area * float(_F32(rng.uniform(scale[0], scale[1])))
        aspect = float(np.exp(_F32(rng.uniform(float(log_ratio[0]), float(log_ratio[1])))))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(rng.integers(0, height - h + 1))
            j = int(rng.integers(0, width - w + 1))
            return i, j, h, w
    return fallback_crop_box(width, height, ratio)


def sample_randaugment(rng: np.random.Generator, config: AugSamplingConfig = AugSamplingConfig()
                       ) -> Optional[List[List[Any]]]:
    """The compressed RandAugment entry ``[[op, mag], ...]``, or ``None`` when skipped (p < 1)."""
    if config.randaugment_p < 1.0 and rng.random() > config.randaugment_p:
        return None  # reference: ``if torch.rand(1) > self.p: return img, None``
    table = magnitude_table(config)
    ops = []
    for _ in range(config.num_ops):
        index = int(rng.integers(len(table)))
        magnitude, signed = table[index]
        if signed and rng.integers(2):
            magnitude *= -1.0
        ops.append([index, magnitude])
    return ops


def sample_aug_params(rng: np.random.Generator, image_width: int, image_height: int,
                      config: AugSamplingConfig = AugSamplingConfig()) -> list:
    """One stored augmentation ``[[i, j, h, w], [[op, mag], ...] | None]`` for a W×H image.

    Draw order per call: crop (2–3 draws per attempt), then the RandAugment skip draw (only when
    ``p < 1``), then op and sign draws. ``image_width``/``image_height`` must be the size of the
    image *as stored*: the box is in its pixels, and the record's ``sha256`` names that file.
    """
    box = sample_crop_box(rng, image_width, image_height, config.scale, config.ratio)
    return [list(box), sample_randaugment(rng, config)]


def sample_aug_params_list(rng: np.random.Generator, image_width: int, image_height: int,
                           n: int, config: AugSamplingConfig = AugSamplingConfig()) -> list:
    """``n`` independent augmentations (the ``param_aug`` list of one record)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"number of augmentations must be a positive int; got {n!r}")
    return [sample_aug_params(rng, image_width, image_height, config)
            for _ in range(int(n))]


def sample_rng(seed: int, key: str) -> np.random.Generator:
    """A generator determined by ``(seed, key)`` alone, for per-sample reproducible draws.

    Built from a SHA-256 of the key (not ``hash()``, which is salted per process), so a shard
    regenerated on another worker, or after a crash, gets the same augmentations.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int; got {seed!r}")
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    words = [int.from_bytes(digest[k:k + 4], "little") for k in range(0, 16, 4)]
    return np.random.default_rng(np.random.SeedSequence([int(seed), *words]))


def _check_size(width: Any, height: Any) -> Tuple[int, int]:
    for name, v in (("image_width", width), ("image_height", height)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
            raise ValueError(f"{name} must be a positive int (pixels of the stored image); "
                             f"got {v!r}")
    return int(width), int(height)
