"""Evaluation-time image preprocessing, identical to open_clip's / Apple's transforms.

The reference pipeline (open_clip ``image_transform(is_train=False)`` with
``resize_mode="shortest"``; Apple ``mobileclip.create_model_and_transforms``) is

    Resize(size)  →  CenterCrop(size)  →  RGB  →  ToTensor ([0, 1])  →  Normalize(mean, std)

on PIL images. This module reproduces it without torch: the resized size and crop offsets are
computed exactly as torchvision computes them (``int(size · long / short)`` for the long side,
``int(round((h − size) / 2))`` for the crop) and PIL does the resampling, as torchvision does
for PIL inputs, so the pixels are the same bits. The output is NHWC float32 — the layout of
the Flax towers — instead of torch's CHW.

Each zoo variant carries its own :class:`PreprocessConfig` (``architecture.md`` §2.5): raw
[0, 1] pixels for MobileCLIP S0/S1/S2/B and MobileCLIP2-S0/S2/B, OpenAI mean/std for the
S3/S4/L-14 towers, bicubic only for L-14. Getting these wrong silently costs accuracy, which is
why callers get the preprocessor from the model factory rather than choosing constants.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Sequence, Tuple, Union

import numpy as np
from PIL import Image

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
ZERO_MEAN = (0.0, 0.0, 0.0)
UNIT_STD = (1.0, 1.0, 1.0)

_PIL_INTERPOLATION = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
                      "nearest": Image.NEAREST}

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray]


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    """What open_clip calls ``PreprocessCfg`` (eval part)."""
    image_size: int
    mean: Tuple[float, float, float] = ZERO_MEAN
    std: Tuple[float, float, float] = UNIT_STD
    interpolation: str = "bilinear"
    resize_mode: str = "shortest"

    def __post_init__(self):
        if self.interpolation not in _PIL_INTERPOLATION:
            raise ValueError(f"interpolation must be one of {sorted(_PIL_INTERPOLATION)}; "
                             f"got {self.interpolation!r}")
        if self.resize_mode != "shortest":
            raise ValueError(f"only resize_mode='shortest' (resize + centre crop, what every "
                             f"MobileCLIP variant uses) is supported; got {self.resize_mode!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean/std must be 3 values with std > 0; got {self.mean}, {self.std}")

    def to_open_clip(self) -> dict:
        """The ``preprocess_cfg`` entry of an ``open_clip_config.json``."""
        return {"size": [self.image_size, self.image_size], "mode": "RGB", "mean": list(self.mean),
                "std": list(self.std), "interpolation": self.interpolation,
                "resize_mode": self.resize_mode}


def resized_size(width: int, height: int, size: int) -> Tuple[int, int]:
    """torchvision ``Resize(size)``: the short side becomes ``size``; the long side is truncated."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def center_crop_box(width: int, height: int, size: int) -> Tuple[int, int, int, int]:
    """torchvision ``CenterCrop(size)`` offsets (round-half-even of the centred offset)."""
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return left, top, left + size, top + size


def load_pil(image: ImageLike) -> Image.Image:
    """A path, PIL image or HWC uint8 array as an RGB PIL image; bad files name the path."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
            raise ValueError(f"array images must be HWC uint8 with 1, 3 or 4 channels; got "
                             f"dtype {image.dtype}, shape {image.shape}")
        return Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).convert("RGB")
    path = pathlib.Path(image)
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except Exception as e:  # PIL raises several types for corrupt or non-image files
        raise ValueError(f"cannot decode image {path}: {e}") from e


class ImagePreprocessor:
    """Callable: one image → ``(size, size, 3)`` float32; :meth:`batch` → ``(N, size, size, 3)``."""

    def __init__(self, config: PreprocessConfig):
        self.config = config
        self._mean = np.asarray(config.mean, np.float32)
        self._std = np.asarray(config.std, np.float32)

    def __repr__(self) -> str:
        return f"ImagePreprocessor({self.config})"

    def resize_and_crop(self, image: ImageLike) -> Image.Image:
        img = load_pil(image)
        size = self.config.image_size
        new_size = resized_size(*img.size, size)
        if new_size != img.size:
            img = img.resize(new_size, _PIL_INTERPOLATION[self.config.interpolation])
        return img.crop(center_crop_box(*img.size, size))

    def __call__(self, image: ImageLike) -> np.ndarray:
        pixels = np.asarray(self.resize_and_crop(image), np.float32) / np.float32(255.0)
        return (pixels - self._mean) / self._std

    def batch(self, images: Sequence[ImageLike]) -> np.ndarray:
        return np.stack([self(im) for im in images]) if len(images) else np.zeros(
            (0, self.config.image_size, self.config.image_size, 3), np.float32)


class RandomResizedCropPreprocessor(ImagePreprocessor):
    """open_clip's default training transform: ``RandomResizedCrop(size, scale=(0.9, 1.0))``
    (bicubic, torchvision's sampling rule incl. its centre-crop fallback) → [0, 1] → normalize.

    Randomness comes from a numpy ``Generator`` (``seed``), so a run is reproducible. The
    reinforced-data pipeline replays stored augmentation parameters instead (data issue).
    """

    def __init__(self, config: PreprocessConfig, scale: Tuple[float, float] = (0.9, 1.0),
                 ratio: Tuple[float, float] = (3 / 4, 4 / 3), seed: int = 0):
        super().__init__(config)
        if not 0 < scale[0] <= scale[1] <= 1 or not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"need 0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1]; "
                             f"got scale={scale}, ratio={ratio}")
        self.scale, self.ratio = scale, ratio
        self.rng = np.random.default_rng(seed)

    def crop_box(self, width: int, height: int) -> Tuple[int, int, int, int]:
        """``(left, top, w, h)`` by torchvision ``RandomResizedCrop.get_params``."""
        area = width * height
        log_lo, log_hi = np.log(self.ratio[0]), np.log(self.ratio[1])
        for _ in range(10):
            target = area * self.rng.uniform(*self.scale)
            aspect = float(np.exp(self.rng.uniform(log_lo, log_hi)))
            w = int(round(np.sqrt(target * aspect)))
            h = int(round(np.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(self.rng.integers(0, height - h + 1))
                left = int(self.rng.integers(0, width - w + 1))
                return left, top, w, h
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            w, h = int(round(height * self.ratio[1])), height
        else:
            w, h = width, height
        return (width - w) // 2, (height - h) // 2, w, h

    def resize_and_crop(self, image: ImageLike) -> Image.Image:
        img = load_pil(image)
        left, top, w, h = self.crop_box(*img.size)
        size = self.config.image_size
        return img.crop((left, top, left + w, top + h)).resize((size, size), Image.BICUBIC)
