"""Replay of DataCompDR's stored augmentations (RandomResizedCrop + RandAugment), numpy/PIL only.

Why replay must be exact: the teacher embeddings stored in a reinforced dataset were computed on
one specific augmented view per stored parameter set. The student is distilled towards those
embeddings, so it has to see *the same* view; a look-alike reimplementation (e.g. in jnp) shifts
the student's view away from the teacher's, which measurably costs accuracy (MobileCLIP P1
appendix B; ``training_and_data.md`` §1.4).

The reference (``apple/ml-mobileclip`` v2 patch ``preprocess_dr`` → ``training/dr/transforms.py``
``Compose.reapply``) runs torchvision's functional ops on **PIL images**, and for PIL inputs
torchvision is a thin wrapper around Pillow. This module calls the same Pillow primitives with
the same arguments (crop box, output size, resampling filter, inverse-affine matrix, fill), so the
replayed uint8 pixels are bit-identical to torchvision's, without importing torch (this code runs
in Grain worker processes). The steps, in the reference's fixed order:

1. ``F.resized_crop(img, i, j, h, w, size, interpolation)``: ``img.crop((j, i, j+w, i+h))`` —
   a box reaching outside the image is padded with black by PIL, never an error — then
   ``img.resize((size, size), interpolation)`` (skipped when the crop already has that size).
   The box is in pixels of the *original* image; the output size is the **student's**. The
   student's train transform in open_clip hard-codes BICUBIC for this resize (§1.4), hence the
   default :data:`TRAIN_CROP_INTERPOLATION`.
2. The stored RandAugment ops, in stored order, with ``torchvision.transforms.autoaugment.
   _apply_op`` semantics: NEAREST resampling for the geometric ops, fill 0, shear about (0, 0),
   translate/rotate about the image centre, ``int()`` of translate and posterize magnitudes.
   The stored translate is in pixels of the teacher's 224 crop and is *not* rescaled (§1.4).
3. ``ToTensor`` + ``Normalize(mean, std)`` with the student's constants, in float32, as HWC.

Stored form of one augmentation (§1.3, §9.3): ``[[i, j, h, w], [[op, mag], [op, mag]]]`` with
``i, j, h, w`` = top, left, height, width; the RandAugment element is ``null`` when it was skipped.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from mobileclip2_jax.data.preprocess import PreprocessConfig

# RandAugment op table, index → name: the order of torchvision's ``_augmentation_space`` and of
# ``training/dr/transforms.py:RandAugment.op_names`` (the index is what DataCompDR stores).
OP_NAMES: Tuple[str, ...] = (
    "Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
    "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")
OP_INDEX: Dict[str, int] = {name: i for i, name in enumerate(OP_NAMES)}

# open_clip ``image_transform(is_train=True)`` builds ``RandomResizedCrop(..., BICUBIC)`` whatever
# the model's eval interpolation is, and the reference copies that transform's interpolation
# into the replayed crop.
TRAIN_CROP_INTERPOLATION = "bicubic"

_RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
             "bicubic": Image.Resampling.BICUBIC}
_GEOMETRIC_RESAMPLE = Image.Resampling.NEAREST  # RandAugment's default, never overridden in DR
_FILL = (0, 0, 0)  # RandAugment fill=None → 0 per band on PIL

ImageInput = Union[np.ndarray, Image.Image]


# --------------------------------------------------------------------------- parameters
@dataclasses.dataclass(frozen=True)
class RandAugmentOp:
    """One stored RandAugment op: index into :data:`OP_NAMES` and the signed magnitude."""
    index: int
    magnitude: float

    @property
    def name(self) -> str:
        return OP_NAMES[self.index]


@dataclasses.dataclass(frozen=True)
class AugParams:
    """A decoded augmentation: crop box in source pixels, then RandAugment ops (None = skipped)."""
    top: int
    left: int
    height: int
    width: int
    ops: Optional[Tuple[RandAugmentOp, ...]]

    @property
    def box(self) -> Tuple[int, int, int, int]:
        return self.top, self.left, self.height, self.width

    def to_stored(self) -> list:
        """The compressed JSON form DataCompDR stores (inverse of :func:`decode_aug_params`)."""
        ops = None if self.ops is None else [[op.index, op.magnitude] for op in self.ops]
        return [[self.top, self.left, self.height, self.width], ops]


def _as_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{what} must be a number; got {value!r}")
    if float(value) != int(value):
        raise ValueError(f"{what} must be an integer; got {value!r}")
    return int(value)


def decode_aug_params(stored: Any) -> AugParams:
    """Parses one stored augmentation ``[[i, j, h, w], [[op, mag], ...] | null]``.

    Also accepts the entry as a JSON string, and ``[[i, j, h, w]]`` (a pipeline without
    RandAugment). Mixup/cutmix pairs are not used by any released dataset and are rejected.
    Raises ``ValueError`` naming what is wrong.
    """
    if isinstance(stored, AugParams):
        return stored
    if isinstance(stored, (str, bytes)):
        try:
            stored = json.loads(stored)
        except json.JSONDecodeError as e:
            raise ValueError(f"augmentation params are not valid JSON: {e}") from None
    if not isinstance(stored, (list, tuple)) or len(stored) not in (1, 2):
        raise ValueError(f"augmentation params must be [[i, j, h, w], ops-or-null]; got {stored!r}")
    box = stored[0]
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        raise ValueError(f"crop box must be [top, left, height, width]; got {box!r} (mixup/cutmix "
                         f"pairs are not supported)")
    top, left, height, width = (_as_int(v, "crop box value") for v in box)
    if height <= 0 or width <= 0:
        raise ValueError(f"crop box height and width must be positive; got {list(box)}")
    raw_ops = stored[1] if len(stored) == 2 else None
    ops = None
    if raw_ops is not None:
        if not isinstance(raw_ops, (list, tuple)):
            raise ValueError(f"RandAugment params must be a list of [op, magnitude] or null; "
                             f"got {raw_ops!r}")
        parsed = []
        for op in raw_ops:
            if not isinstance(op, (list, tuple)) or len(op) != 2:
                raise ValueError(f"RandAugment op must be [op_index, magnitude]; got {op!r}")
            index = _as_int(op[0], "RandAugment op index")
            if not 0 <= index < len(OP_NAMES):
                raise ValueError(f"RandAugment op index {index} out of range "
                                 f"0..{len(OP_NAMES) - 1}")
            if isinstance(op[1], bool) or not isinstance(op[1], (int, float, np.number)) \
                    or not math.isfinite(float(op[1])):
                raise ValueError(f"RandAugment magnitude must be a finite number; got {op[1]!r}")
            parsed.append(RandAugmentOp(index, float(op[1])))
        ops = tuple(parsed)
    return AugParams(top, left, height, width, ops)


# --------------------------------------------------------------------------- crop
def crop_padding_pixels(image_width: int, image_height: int, top: int, left: int, height: int,
                        width: int) -> int:
    """How many pixels of the crop box lie outside the image (PIL pads them with black)."""
    inside_h = max(0, min(top + height, image_height) - max(top, 0))
    inside_w = max(0, min(left + width, image_width) - max(left, 0))
    return height * width - inside_h * inside_w


def resized_crop(img: Image.Image, top: int, left: int, height: int, width: int, size: int,
                 interpolation: str = TRAIN_CROP_INTERPOLATION) -> Image.Image:
    """torchvision ``F.resized_crop`` on a PIL image, square output ``size``."""
    if interpolation not in _RESAMPLE:
        raise ValueError(f"interpolation must be one of {sorted(_RESAMPLE)}; got {interpolation!r}")
    img = img.crop((left, top, left + width, top + height))
    if img.size == (size, size):  # torchvision returns the crop untouched
        return img
    return img.resize((size, size), _RESAMPLE[interpolation])


# --------------------------------------------------------------------------- RandAugment ops
def _inverse_affine_matrix(center: Sequence[float], angle: float, translate: Sequence[float],
                           shear: Sequence[float]) -> list:
    """PIL's inverse affine coefficients as torchvision ``_get_inverse_affine_matrix`` builds them
    (scale 1), same float operations in the same order so the coefficients are bit-equal.

    Forward map M = T · C · R(angle) · SHy(shear_y) · SHx(shear_x) · C⁻¹; PIL wants M⁻¹.
    """
    rot = math.radians(angle)
    sx, sy = math.radians(shear[0]), math.radians(shear[1])
    cx, cy = center
    tx, ty = translate
    a = math.cos(rot - sy) / math.cos(sy)
    b = -math.cos(rot - sy) * math.tan(sx) / math.cos(sy) - math.sin(rot)
    c = math.sin(rot - sy) / math.cos(sy)
    d = -math.sin(rot - sy) * math.tan(sx) / math.cos(sy) + math.cos(rot)
    m = [d, -b, 0.0, -c, a, 0.0]  # torchvision then divides by scale = 1.0: exact no-op
    m[2] += m[0] * (-cx - tx) + m[1] * (-cy - ty)
    m[5] += m[3] * (-cx - tx) + m[4] * (-cy - ty)
    m[2] += cx
    m[5] += cy
    return m


def _affine(img: Image.Image, center: Sequence[float], translate: Sequence[float],
            shear: Sequence[float]) -> Image.Image:
    matrix = _inverse_affine_matrix(center, 0.0, translate, shear)
    return img.transform(img.size, Image.Transform.AFFINE, matrix, _GEOMETRIC_RESAMPLE,
                         fillcolor=_FILL)


def identity(img: Image.Image, magnitude: float = 0.0) -> Image.Image:
    return img


def shear_x(img: Image.Image, magnitude: float) -> Image.Image:
    """Shear parallel to x by atan(magnitude), about the top-left corner."""
    return _affine(img, (0, 0), (0, 0), (math.degrees(math.atan(magnitude)), 0.0))


def shear_y(img: Image.Image, magnitude: float) -> Image.Image:
    return _affine(img, (0, 0), (0, 0), (0.0, math.degrees(math.atan(magnitude))))


def translate_x(img: Image.Image, magnitude: float) -> Image.Image:
    """Shift right by ``int(magnitude)`` pixels (truncated toward zero, as torchvision does)."""
    w, h = img.size
    return _affine(img, (w * 0.5, h * 0.5), (int(magnitude), 0), (0.0, 0.0))


def translate_y(img: Image.Image, magnitude: float) -> Image.Image:
    w, h = img.size
    return _affine(img, (w * 0.5, h * 0.5), (0, int(magnitude)), (0.0, 0.0))


def rotate(img: Image.Image, magnitude: float) -> Image.Image:
    """Counter-clockwise by ``magnitude`` degrees about the centre, same canvas."""
    return img.rotate(magnitude, _GEOMETRIC_RESAMPLE, False, None, fillcolor=_FILL)


def brightness(img: Image.Image, magnitude: float) -> Image.Image:
    return ImageEnhance.Brightness(img).enhance(1.0 + magnitude)


def color(img: Image.Image, magnitude: float) -> Image.Image:
    return ImageEnhance.Color(img).enhance(1.0 + magnitude)


def contrast(img: Image.Image, magnitude: float) -> Image.Image:
    return ImageEnhance.Contrast(img).enhance(1.0 + magnitude)


def sharpness(img: Image.Image, magnitude: float) -> Image.Image:
    return ImageEnhance.Sharpness(img).enhance(1.0 + magnitude)


def posterize(img: Image.Image, magnitude: float) -> Image.Image:
    bits = int(magnitude)
    if not 0 <= bits <= 8:
        raise ValueError(f"posterize bits must be in 0..8; got {bits}")
    return ImageOps.posterize(img, bits)


def solarize(img: Image.Image, magnitude: float) -> Image.Image:
    """Invert every value ≥ ``magnitude`` (a float threshold, 178.5 in DataCompDR)."""
    return ImageOps.solarize(img, magnitude)


def autocontrast(img: Image.Image, magnitude: float = 0.0) -> Image.Image:
    return ImageOps.autocontrast(img)


def equalize(img: Image.Image, magnitude: float = 0.0) -> Image.Image:
    return ImageOps.equalize(img)


OPS: Tuple[Callable[[Image.Image, float], Image.Image], ...] = (
    identity, shear_x, shear_y, translate_x, translate_y, rotate, brightness, color, contrast,
    sharpness, posterize, solarize, autocontrast, equalize)


def apply_op(img: Image.Image, op: Union[int, str], magnitude: float) -> Image.Image:
    """One RandAugment op by stored index or torchvision name (``_apply_op`` semantics)."""
    index = OP_INDEX.get(op) if isinstance(op, str) else int(op)
    if index is None or not 0 <= index < len(OPS):
        raise ValueError(f"unknown RandAugment op {op!r}; known: {OP_NAMES}")
    return OPS[index](img, magnitude)


# --------------------------------------------------------------------------- full replay
@dataclasses.dataclass(frozen=True)
class ReplayStats:
    """Per-sample facts worth counting in a data pipeline.

    ``padded_pixels > 0`` means the stored box reached outside the decoded image, which for
    DataCompDR usually means the image differs from the one used at generation time (e.g.
    re-encoded or resized). Replay still matches torchvision (black padding).
    """
    image_size: Tuple[int, int]  # (width, height) of the decoded source image
    crop_pixels: int
    padded_pixels: int
    randaugment_skipped: bool

    @property
    def out_of_bounds(self) -> bool:
        return self.padded_pixels > 0

    @property
    def padded_fraction(self) -> float:
        return self.padded_pixels / self.crop_pixels


def to_pil_rgb(image: ImageInput) -> Image.Image:
    """HW / HWC (1, 3 or 4 channels) uint8 array or PIL image → RGB PIL image.

    Alpha is dropped without compositing, as the reference's ``pilrgba`` → ``convert('RGB')``.
    """
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in
                                                           (1, 3, 4)):
        raise ValueError(f"images must be HW or HWC uint8 with 1, 3 or 4 channels; got dtype "
                         f"{arr.dtype}, shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"empty image of shape {arr.shape}")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return Image.fromarray(np.ascontiguousarray(arr)).convert("RGB")


def replay_pil(image: ImageInput, params: Union[AugParams, Any], size: int,
               interpolation: str = TRAIN_CROP_INTERPOLATION) -> Tuple[Image.Image, ReplayStats]:
    """Crop + resize + RandAugment as PIL, before ``ToTensor``: the reference's uint8 view."""
    params = decode_aug_params(params)
    img = to_pil_rgb(image)
    stats = ReplayStats(img.size, params.height * params.width,
                        crop_padding_pixels(*img.size, *params.box), params.ops is None)
    img = resized_crop(img, *params.box, size, interpolation)
    for op in params.ops or ():
        img = OPS[op.index](img, op.magnitude)
    return img, stats


def replay_uint8(image: ImageInput, params: Union[AugParams, Any], size: int,
                 interpolation: str = TRAIN_CROP_INTERPOLATION) -> Tuple[np.ndarray, ReplayStats]:
    """:func:`replay_pil` as an ``(size, size, 3)`` uint8 array."""
    img, stats = replay_pil(image, params, size, interpolation)
    return np.asarray(img, dtype=np.uint8), stats


class Normalizer:
    """``ToTensor`` + ``Normalize`` on HWC uint8 → float32, bit-equal to torchvision's.

    torch computes ``(float32(v) / 255 − mean) / std`` in float32 with correctly rounded ops;
    numpy does the same ops in the same order, in place (a lookup table was not faster).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)
        self._identity = bool(np.all(self.mean == 0) and np.all(self.std == 1))

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[-1] != 3:
            raise ValueError(f"expected HWC uint8 RGB; got {pixels.dtype} {pixels.shape}")
        out = pixels.astype(np.float32)
        out /= np.float32(255.0)
        if self._identity:  # raw [0, 1] pixels (MobileCLIP S0/S2/B): x − 0 and x / 1 are exact
            return out
        out -= self.mean
        out /= self.std
        return out


def normalize(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """``(pixels / 255 − mean) / std`` in float32 (one-off form of :class:`Normalizer`)."""
    return Normalizer(mean, std)(pixels)


class Replayer:
    """Replay bound to one student's preprocessing; keeps the normalization table.

    ``interpolation=None`` uses ``config.interpolation`` (the model's *eval* filter) instead of
    the reference's bicubic train crop.
    """

    def __init__(self, config: PreprocessConfig,
                 interpolation: Optional[str] = TRAIN_CROP_INTERPOLATION):
        self.config = config
        self.interpolation = config.interpolation if interpolation is None else interpolation
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation must be one of {sorted(_RESAMPLE)}; "
                             f"got {self.interpolation!r}")
        self.normalizer = Normalizer(config.mean, config.std)

    def __call__(self, image: ImageInput, params: Union[AugParams, Any]
                 ) -> Tuple[np.ndarray, ReplayStats]:
        pixels, stats = replay_uint8(image, params, self.config.image_size, self.interpolation)
        return self.normalizer(pixels), stats


def replay(image: ImageInput, params: Union[AugParams, Any], config: PreprocessConfig, *,
           interpolation: Optional[str] = TRAIN_CROP_INTERPOLATION
           ) -> Tuple[np.ndarray, ReplayStats]:
    """Replays one stored augmentation for a student: ``(size, size, 3)`` float32 HWC + stats.

    ``params`` is the stored list (or its JSON string) or an :class:`AugParams`. For many
    samples build a :class:`Replayer` once instead.
    """
    return Replayer(config, interpolation)(image, params)
