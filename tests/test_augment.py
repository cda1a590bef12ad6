"""Augmentation replay (``data/augment.py``) against torchvision on real photos.

The reference is what ``training/dr/transforms.py:Compose.reapply`` runs on a PIL image:
``F.resized_crop(img, i, j, h, w, (s, s), BICUBIC)`` then, per stored op,
``autoaugment._apply_op(img, name, mag, interpolation=NEAREST, fill=None)`` (RandAugment's
defaults, which DR never overrides), then ``ToTensor`` + ``Normalize``. Magnitudes are taken
from torchvision's own ``_augmentation_space`` at bin 9 of 31 for a 224 crop — the values
DataCompDR stores (§9.3) — with both signs for the signed ops.
"""
import ast
import itertools
import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from conftest import requires_torch
from mobileclip2_jax.data import augment as A
from mobileclip2_jax.data.preprocess import OPENAI_MEAN, OPENAI_STD, PreprocessConfig

DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
COCO = DATA / "coco_mini" / "train2017"
GRAY = COCO / "000000113488.jpg"  # the grayscale COCO photo (stored as RGB, r = g = b)
needs_data = pytest.mark.skipif(not COCO.exists(), reason="shared photos not found")
MAX_ABS_DIFF = 1  # the bound on uint8; the implementation is in fact bit-exact


def _photos():
    """A colour COCO photo, the grayscale one (as mode L), a clothing photo, a 32×32 CIFAR one."""
    clothing = sorted((DATA / "clothing" / "train" / "dress").glob("*.jpg"))[0]
    cifar = sorted((DATA / "cifar10_test" / "cat").glob("*.jpg"))[0]
    return {
        "coco": Image.open(COCO / "000000084284.jpg").convert("RGB"),  # 500×375
        "gray": Image.open(GRAY).convert("L"),
        "clothing": Image.open(clothing).convert("RGB"),
        "cifar": Image.open(cifar).convert("RGB"),
    }


@pytest.fixture(scope="module")
def photos():
    return _photos()


def _boxes(w, h):
    """Inside (odd size), past the bottom-right edge, negative top-left, 224² (no resize)"""
    boxes = [(h // 8, w // 10, h // 2 | 1, (w * 3 // 5) | 1),
             (h // 3, w // 2, h, w * 3 // 4),
             (-(h // 10) - 1, -(w // 7) - 1, h // 2 + 3, w // 2)]
    if min(w, h) > 240:
        boxes.append((5, 7, 224, 224))
    return boxes


@pytest.fixture(scope="module")
def tv():
    from mobileclip2_jax.convert.torch_env import ensure_torchvision_importable
    ensure_torchvision_importable()
    import torchvision.transforms as T
    import torchvision.transforms.functional as F
    from torchvision.transforms import autoaugment
    return T, F, autoaugment


@pytest.fixture(scope="module")
def magnitudes(tv):
    """op name → (DataCompDR magnitude, signed): torchvision's table at bin 9 of 31, 224 px."""
    T = tv[0]
    space = T.RandAugment()._augmentation_space(31, (224, 224))
    return {name: (float(m[9].item()) if m.ndim > 0 else 0.0, bool(signed))
            for name, (m, signed) in space.items()}


def _reference(tv, img, aug, size, interpolation="bicubic"):
    """torchvision's replay of one stored augmentation on a PIL image (uint8 HWC)."""
    T, F, autoaugment = tv
    interp = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}
    img = img.convert("RGB")
    i, j, h, w = aug[0]
    img = F.resized_crop(img, i, j, h, w, [size, size], interp[interpolation])
    for op, mag in aug[1] or []:
        img = autoaugment._apply_op(img, A.OP_NAMES[op], mag,
                                    interpolation=T.InterpolationMode.NEAREST, fill=None)
    return np.asarray(img)


def _max_diff(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


@requires_torch
def test_op_table_is_torchvisions_order(magnitudes):
    assert A.OP_NAMES == tuple(magnitudes)
    # The DataCompDR magnitudes of §9.3 (as float32 values, the way the HF rows show them).
    assert magnitudes["ShearX"][0] == pytest.approx(0.09)
    assert magnitudes["TranslateX"][0] == pytest.approx(30.45317268371582)
    assert magnitudes["Rotate"][0] == 9.0 and magnitudes["Posterize"][0] == 7.0
    assert magnitudes["Solarize"][0] == 178.5
    assert magnitudes["Brightness"][0] == pytest.approx(0.27)


@requires_torch
@needs_data
@pytest.mark.parametrize("op_name", A.OP_NAMES)
def test_each_op_alone_matches_torchvision(photos, tv, magnitudes, op_name):
    mag, signed = magnitudes[op_name]
    changed = False
    for (name, img), size in itertools.product(photos.items(), (224, 256)):
        for box, sign in itertools.product(_boxes(*img.size), (1, -1) if signed else (1,)):
            aug = [list(box), [[A.OP_INDEX[op_name], sign * mag]]]
            ours, stats = A.replay_uint8(np.asarray(img), aug, size)
            ref = _reference(tv, img, aug, size)
            assert _max_diff(ours, ref) <= MAX_ABS_DIFF, (op_name, name, box, sign, size)
            assert stats.out_of_bounds == (box[0] < 0 or box[1] < 0 or box[0] + box[2] > img.size[1]
                                           or box[1] + box[3] > img.size[0])
            crop_only, _ = A.replay_uint8(np.asarray(img), [list(box), None], size)
            changed |= not np.array_equal(ours, crop_only)
    assert changed or op_name == "Identity", f"{op_name} never changed an image"


@requires_torch
@needs_data
def test_stored_pairs_match_torchvision(photos, tv, magnitudes):
    """Every ordered pair of ops (random signs), plus the HF viewer rows of §9.2."""
    img = photos["coco"]
    rng = np.random.default_rng(0)
    entries = [
        [[14, 347, 370, 427], [[0, 0.0], [6, 0.26999998092651367]]],  # reaches past 500×375
        [[45, 20, 54, 64], [[11, 178.5], [12, 0.0]]],
        [[32, 291, 657, 709], [[2, -0.09000000357627869], [4, -30.45317268371582]]],
        [[56, 1, 910, 895], [[13, 0.0], [5, -9.0]]],
    ]
    for a, b in itertools.product(A.OP_NAMES, repeat=2):
        ops = []
        for name in (a, b):
            mag, signed = magnitudes[name]
            ops.append([A.OP_INDEX[name], -mag if signed and rng.integers(2) else mag])
        entries.append([[20, 30, 300, 380], ops])
    for aug in entries:
        ours, _ = A.replay_uint8(img, aug, 224)
        assert _max_diff(ours, _reference(tv, img, aug, 224)) <= MAX_ABS_DIFF, aug
    gray = photos["gray"]
    for aug in entries[:4]:
        ours, _ = A.replay_uint8(gray, aug, 256)
        assert _max_diff(ours, _reference(tv, gray, aug, 256)) <= MAX_ABS_DIFF, aug


@requires_torch
@needs_data
def test_crop_box_alone_pads_black_and_counts(photos, tv):
    T, F, _ = tv
    for name, img in photos.items():
        w, h = img.size
        for box in _boxes(w, h) + [(h + 5, 0, 10, 10)]:  # last: wholly outside
            ours, stats = A.replay_uint8(img, [list(box), None], 224)
            assert _max_diff(ours, _reference(tv, img, [box, None], 224)) <= MAX_ABS_DIFF
            # The padded count is what PIL pads: crop an all-white image with the same box.
            white = Image.new("L", (w, h), 255).crop((box[1], box[0], box[1] + box[3],
                                                      box[0] + box[2]))
            assert stats.padded_pixels == int((np.asarray(white) == 0).sum()), (name, box)
            assert stats.crop_pixels == box[2] * box[3] and stats.image_size == (w, h)
            assert stats.randaugment_skipped
        _, stats = A.replay_uint8(img, [[h + 5, 0, 10, 10], None], 8)
        assert stats.padded_fraction == 1.0
    dark, _ = A.replay_uint8(photos["cifar"], [[40, 0, 10, 10], None], 16)
    assert not dark.any()


@requires_torch
@needs_data
@pytest.mark.parametrize("mean,std", [(OPENAI_MEAN, OPENAI_STD), ((0.0,) * 3, (1.0,) * 3)])
def test_normalized_output(photos, tv, mean, std):
    T = tv[0]
    import torch
    config = PreprocessConfig(image_size=256, mean=mean, std=std)
    aug = [[10, 40, 300, 280], [[8, -0.26999998092651367], [3, 30.45317268371582]]]
    img = photos["coco"]
    out, stats = A.replay(np.asarray(img), aug, config)
    pixels, _ = A.replay_uint8(img, aug, 256)
    assert out.shape == (256, 256, 3) and out.dtype == np.float32
    expect = (pixels / 255.0 - np.asarray(mean)) / np.asarray(std)
    np.testing.assert_allclose(out, expect, rtol=0, atol=2e-6)
    # Bit-equal to torchvision's ToTensor + Normalize on the reference's PIL view.
    ref = T.Normalize(mean, std)(T.ToTensor()(Image.fromarray(_reference(tv, img, aug, 256))))
    np.testing.assert_array_equal(out, ref.permute(1, 2, 0).numpy())
    assert not stats.out_of_bounds


@requires_torch
@needs_data
def test_student_interpolation_override(photos, tv):
    """Default = the reference's bicubic train crop; ``None`` = the config's (eval) filter."""
    img, aug = photos["clothing"], [[30, 20, 301, 257], [[9, 0.26999998092651367]]]
    config = PreprocessConfig(image_size=224, interpolation="bilinear")
    bicubic, _ = A.Replayer(config)(img, aug)
    bilinear, _ = A.Replayer(config, interpolation=None)(img, aug)
    for out, interp in ((bicubic, "bicubic"), (bilinear, "bilinear")):
        ref = _reference(tv, img, aug, 224, interp)
        assert np.array_equal(np.rint(out * 255).astype(np.uint8), ref)
    assert not np.array_equal(bicubic, bilinear)
    with pytest.raises(ValueError, match="interpolation"):
        A.Replayer(config, interpolation="lanczos")


@needs_data
def test_input_forms_are_converted_to_rgb(photos):
    """Gray 2-D / HWC-1 / PIL L agree; RGBA drops alpha without compositing (as ``pilrgba``)."""
    aug = [[5, 5, 200, 300], [[1, 0.09000000357627869], [12, 0.0]]]
    gray = photos["gray"]
    arr = np.asarray(gray)
    outs = [A.replay_uint8(x, aug, 64)[0] for x in (gray, arr, arr[..., None], gray.convert("RGB"))]
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])
    rgb = np.asarray(photos["coco"])
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 7, np.uint8)], -1)
    np.testing.assert_array_equal(A.replay_uint8(rgba, aug, 64)[0], A.replay_uint8(rgb, aug, 64)[0])
    for bad in (np.zeros((4, 4, 3), np.float32), np.zeros((4, 4, 2), np.uint8),
                np.zeros((0, 4, 3), np.uint8)):
        with pytest.raises(ValueError):
            A.replay_uint8(bad, aug, 8)


def test_decode_round_trip_and_errors():
    stored = [[14, 347, 370, 427], [[0, 0.0], [6, 0.26999998092651367]]]
    p = A.decode_aug_params(stored)
    assert p.box == (14, 347, 370, 427) and [op.name for op in p.ops] == ["Identity", "Brightness"]
    assert p.to_stored() == stored
    assert A.decode_aug_params(json.dumps(stored)) == p
    assert A.decode_aug_params(p) is p
    assert A.decode_aug_params([[1, 2, 3, 4], None]).ops is None
    assert A.decode_aug_params([[1, 2, 3, 4]]).ops is None
    assert A.decode_aug_params([[1, 2, 3, 4], []]).ops == ()
    bad = [
        [[1, 2, 3], None],                         # short box
        [[1, 2, 0, 4], None],                      # empty box
        [[1, 2, 3.5, 4], None],                    # fractional box
        [[1, 2, 3, 4], [[14, 0.0]]],               # op index out of range
        [[1, 2, 3, 4], [[1, float("nan")]]],       # non-finite magnitude
        [[1, 2, 3, 4], [[1]]],                     # op without magnitude
        [[1, 2, 3, 4], "x"],
        [7, [[[1, 2, 3, 4], None], None]],         # mixup/cutmix pair form
        "not json",
        None,
    ]
    for b in bad:
        with pytest.raises(ValueError):
            A.decode_aug_params(b)


def test_per_op_functions_on_synthetic_image():
    """Cheap checks without torchvision: translate shifts by int(m) px, posterize bounds."""
    img = Image.fromarray(np.arange(64 * 64 * 3, dtype=np.uint8).reshape(64, 64, 3))
    moved = np.asarray(A.translate_x(img, 5.9))  # int(5.9) = 5 px to the right
    np.testing.assert_array_equal(moved[:, 5:], np.asarray(img)[:, :-5])
    assert not moved[:, :5].any()
    moved = np.asarray(A.apply_op(img, "TranslateY", -3.2))
    np.testing.assert_array_equal(moved[:-3], np.asarray(img)[3:])
    assert A.apply_op(img, 0, 0.0) is img
    with pytest.raises(ValueError):
        A.posterize(img, 9)
    with pytest.raises(ValueError):
        A.apply_op(img, "Invert", 0.0)
    assert A.crop_padding_pixels(10, 10, -1, -1, 3, 3) == 5
    assert A.crop_padding_pixels(10, 10, 0, 0, 10, 10) == 0


def test_no_jax_or_torch_imports():
    """Both modules run in Grain workers: numpy/PIL only (checked on the source)."""
    root = pathlib.Path(A.__file__).parent
    for name in ("augment.py", "sampling.py"):
        tree = ast.parse((root / name).read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                imported.add((node.module or "").split(".")[0])
        assert not imported & {"jax", "jaxlib", "flax", "torch", "torchvision"}, (name, imported)
