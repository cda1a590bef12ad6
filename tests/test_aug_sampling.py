"""Sampling new DataCompDR-style augmentations (``data/aug_sampling.py``).

The reference is torchvision's ``RandomResizedCrop.get_params`` and ``RandAugment`` as
``training/dr/transforms.py`` uses them: the tests compare value sets exactly (magnitude table,
fallback boxes) and distributions statistically (we use a numpy Generator, not torch's stream).
"""
import json
import math
import pathlib

import numpy as np
import pytest
from PIL import Image

from conftest import requires_torch
from mobileclip2_jax.data import augment as A
from mobileclip2_jax.data import aug_sampling as S
from mobileclip2_jax.data.preprocess import OPENAI_MEAN, OPENAI_STD, PreprocessConfig
from mobileclip2_jax.data.records import DatasetMetadata, Teacher

DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
COCO_PHOTO = DATA / "coco_mini" / "train2017" / "000000084284.jpg"  # 500×375
needs_data = pytest.mark.skipif(not COCO_PHOTO.exists(), reason="shared photos not found")

# apple/ml-mobileclip training/configs/datacompdr12m.json (datacompdr1b.json has the same
# "image_augmentation"): the generation config of every released reinforced dataset.
DATACOMPDR_IMAGE_AUGMENTATION = {
    "normalize": {"mean": [0.48145466, 0.4578275, 0.40821073],
                  "std": [0.26862954, 0.26130258, 0.27577711]},
    "rand_augment": {"enable": True, "p": 1.0},
    "random_resized_crop": {"interpolation": "bicubic", "size": 224},
    "to_rgb": {"enable": True}, "to_tensor": {"enable": True}}

SIZES = [(640, 480), (480, 640), (224, 224), (500, 375), (1000, 10), (37, 1500), (32, 32), (1, 1)]


def _torchvision():
    from mobileclip2_jax.convert.torch_env import ensure_torchvision_importable
    ensure_torchvision_importable()
    import torch
    import torchvision.transforms as T
    return torch, T


# ------------------------------------------------------------------------ magnitude table
def test_stored_magnitudes_are_datacompdr_values():
    """The values the HF viewer shows in DataCompDR rows (§1.3, §9.2), exactly."""
    table = dict(zip(A.OP_NAMES, S.magnitude_table()))
    assert table["ShearX"] == table["ShearY"] == (0.09000000357627869, True)
    assert table["TranslateX"] == table["TranslateY"] == (30.45317268371582, True)
    assert table["Rotate"] == (9.0, True)
    for op in ("Brightness", "Color", "Contrast", "Sharpness"):
        assert table[op] == (0.26999998092651367, True)
    assert table["Posterize"] == (7.0, False) and table["Solarize"] == (178.5, False)
    for op in ("Identity", "AutoContrast", "Equalize"):
        assert table[op] == (0.0, False)
    assert tuple(n for n, (_, signed) in table.items() if signed) == S.SIGNED_OPS


@requires_torch
@pytest.mark.parametrize("bins,size", [(31, 224), (31, 256), (11, 224), (51, 100), (101, 224)])
def test_augmentation_space_equals_torchvision(bins, size):
    """Every bin of every op equals torchvision's float32 tensors (not only bin 9)."""
    torch, T = _torchvision()
    ref = T.RandAugment(num_magnitude_bins=bins)._augmentation_space(bins, (size, size + 7))
    ours = S.augmentation_space(bins, (size, size + 7))
    assert list(ours) == list(ref) == list(A.OP_NAMES)
    for name, (mags, signed) in ref.items():
        assert ours[name][1] == signed, name
        if mags.ndim == 0:
            assert ours[name][0] is None and float(mags) == 0.0
        else:
            np.testing.assert_array_equal(ours[name][0], mags.numpy(), err_msg=name)
            assert ours[name][0].dtype == (np.float32 if mags.is_floating_point() else np.int32)


@requires_torch
@pytest.mark.parametrize("magnitude", [0, 9, 15, 30])
def test_magnitude_table_equals_torchvision_forward_values(magnitude):
    """What the reference's forward stores: ``float(magnitudes[m].item())`` per op."""
    _, T = _torchvision()
    cfg = S.AugSamplingConfig(magnitude=magnitude)
    ref = T.RandAugment()._augmentation_space(31, (224, 224))
    expected = tuple((float(m[magnitude].item()) if m.ndim > 0 else 0.0, s)
                     for m, s in ref.values())
    assert S.magnitude_table(cfg) == expected


# ------------------------------------------------------------------------------ crop boxes
def _area_and_aspect_ok(box, w_img, h_img, scale, ratio):
    """Inside the configured ranges up to the ±0.5 px rounding of w and h."""
    _, _, h, w = box
    area, tol = w * h, 0.5 * (w + h) + 0.25
    ok_area = scale[0] * w_img * h_img - tol <= area <= scale[1] * w_img * h_img + tol
    ok_aspect = (w - 0.5) / (h + 0.5) <= ratio[1] and (w + 0.5) / (h - 0.5) >= ratio[0]
    return ok_area and ok_aspect


@pytest.mark.parametrize("size", SIZES)
def test_crop_boxes_inside_image_and_in_range(size):
    w_img, h_img = size
    cfg = S.AugSamplingConfig()
    rng = np.random.default_rng(1)
    fallback = S.fallback_crop_box(w_img, h_img, cfg.ratio)
    n_fallback_shaped = 0
    for _ in range(1500):
        box = S.sample_crop_box(rng, w_img, h_img, cfg.scale, cfg.ratio)
        i, j, h, w = box
        assert all(isinstance(v, int) for v in box)
        assert 0 <= i and 0 <= j and 0 < h and 0 < w and i + h <= h_img and j + w <= w_img, box
        if box == fallback:
            n_fallback_shaped += 1
        else:
            assert _area_and_aspect_ok(box, w_img, h_img, cfg.scale, cfg.ratio), box
    if w_img / h_img > 50 or h_img / w_img > 20:  # no attempt can fit: always the fallback
        assert n_fallback_shaped == 1500
    elif min(size) >= 224:
        assert n_fallback_shaped < 30  # fallback after 10 misses is rare for photos


def test_crop_statistics_follow_the_configured_distribution():
    """Area fraction ~ U(scale) and log-aspect ~ U(log ratio), as long as the box fits."""
    # square image, area ≤ ½: every drawn (area, aspect) fits (side ≤ √(½·4/3) < 1), so there
    # is no rejection and the accepted boxes must show the raw distributions
    w_img = h_img = 1000
    rng = np.random.default_rng(2)
    boxes = np.array([S.sample_crop_box(rng, w_img, h_img, scale=(0.08, 0.5))
                      for _ in range(4000)])
    frac = boxes[:, 2] * boxes[:, 3] / (w_img * h_img)
    log_ar = np.log(boxes[:, 3] / boxes[:, 2])
    assert abs(frac.mean() - 0.29) < 0.01 and frac.min() > 0.079 and frac.max() < 0.502
    np.testing.assert_allclose(np.histogram(frac, bins=4, range=(0.08, 0.5))[0] / len(frac),
                               0.25, atol=0.03)
    lo, hi = math.log(3 / 4), math.log(4 / 3)
    assert abs(log_ar.mean()) < 0.01 and log_ar.min() > lo - 0.01 and log_ar.max() < hi + 0.01
    # uniform in log-ratio: each quarter of the range holds ~25 %
    counts = np.histogram(log_ar, bins=4, range=(lo, hi))[0] / len(log_ar)
    np.testing.assert_allclose(counts, 0.25, atol=0.03)
    # top-left uniform over the free range: mean of i / (H − h) ≈ ½
    free = np.maximum(h_img - boxes[:, 2], 1)
    assert abs((boxes[:, 0] / free).mean() - 0.5) < 0.03


@requires_torch
@pytest.mark.parametrize("size", [(640, 480), (375, 500), (100, 600)])
def test_crop_distribution_matches_torchvision(size):
    """Same distribution as torchvision's own get_params (incl. rejection on a skinny image)."""
    torch, T = _torchvision()
    w_img, h_img = size
    torch.manual_seed(0)
    img = torch.empty(3, h_img, w_img)
    ref = np.array([T.RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3])
                    for _ in range(3000)], dtype=np.float64)
    rng = np.random.default_rng(3)
    ours = np.array([S.sample_crop_box(rng, w_img, h_img) for _ in range(3000)], np.float64)
    for stat in (lambda b: b[:, 2] * b[:, 3] / (w_img * h_img), lambda b: np.log(b[:, 3] / b[:, 2]),
                 lambda b: b[:, 0] / h_img, lambda b: b[:, 1] / w_img):
        a, b = stat(ref), stat(ours)
        np.testing.assert_allclose(np.quantile(a, [0.1, 0.25, 0.5, 0.75, 0.9]),
                                   np.quantile(b, [0.1, 0.25, 0.5, 0.75, 0.9]), atol=0.04)


@requires_torch
@pytest.mark.parametrize("ratio", [(3 / 4, 4 / 3), (0.5, 2.0), (1.0, 1.0)])
def test_fallback_box_equals_torchvision(ratio):
    """scale ≫ 1 makes all 10 attempts fail, so torchvision returns its central fallback."""
    torch, T = _torchvision()
    rng = np.random.default_rng(4)
    sizes = SIZES + [(w, h) for w in (3, 17, 224, 641) for h in (5, 224, 333, 1024)]
    cfg = S.AugSamplingConfig(scale=(50.0, 60.0), ratio=ratio)
    for w_img, h_img in sizes:
        ref = tuple(T.RandomResizedCrop.get_params(torch.empty(3, h_img, w_img),
                                                   list(cfg.scale), list(ratio)))
        assert S.fallback_crop_box(w_img, h_img, ratio) == ref, (w_img, h_img)
        assert S.sample_aug_params(rng, w_img, h_img, cfg)[0] == list(ref)
    # the default config on a skinny image also falls back, to the same box
    ref = T.RandomResizedCrop.get_params(torch.empty(3, 10, 1000), [0.08, 1.0], [3 / 4, 4 / 3])
    assert S.sample_crop_box(rng, 1000, 10) == tuple(ref) == (0, 493, 10, 13)


# ------------------------------------------------------------------------------ RandAugment
def test_randaugment_op_and_sign_distribution():
    rng = np.random.default_rng(5)
    table = S.magnitude_table()
    ops = [op for _ in range(10000) for op in S.sample_randaugment(rng)]
    assert len(ops) == 20000
    idx = np.array([o[0] for o in ops])
    mags = np.array([o[1] for o in ops])
    counts = np.bincount(idx, minlength=14)
    expected = len(ops) / 14
    assert np.all(np.abs(counts - expected) < 5 * math.sqrt(expected)), counts  # uniform ops
    for k, (m, signed) in enumerate(table):
        sel = mags[idx == k]
        if signed:
            assert set(sel) == {m, -m}
            assert abs((sel < 0).mean() - 0.5) < 0.05  # sign flipped with probability ½
        else:
            assert set(sel) == {m}
    assert all(isinstance(o[0], int) and isinstance(o[1], float) for o in ops)


def test_randaugment_probability_stores_null():
    rng = np.random.default_rng(6)
    half = S.AugSamplingConfig(randaugment_p=0.5)
    params = S.sample_aug_params_list(rng, 640, 480, 2000, half)
    skipped = np.mean([p[1] is None for p in params])
    assert abs(skipped - 0.5) < 0.05
    assert all(A.decode_aug_params(json.loads(json.dumps(p))).ops is None
               for p in params if p[1] is None)
    none = S.sample_aug_params_list(rng, 640, 480, 50, S.AugSamplingConfig(randaugment_p=0.0))
    assert all(p[1] is None for p in none)
    always = S.sample_aug_params_list(rng, 640, 480, 500, S.AugSamplingConfig())
    assert all(p[1] is not None and len(p[1]) == 2 for p in always)


@needs_data
def test_sampled_params_decode_and_replay():
    image = Image.open(COCO_PHOTO).convert("RGB")
    rng = np.random.default_rng(7)
    params = S.sample_aug_params_list(rng, *image.size, 24)
    replayer = A.Replayer(PreprocessConfig(image_size=224, mean=OPENAI_MEAN, std=OPENAI_STD))
    for p in params:
        stored = json.loads(json.dumps(p))  # what paug.json holds
        assert stored == p
        decoded = A.decode_aug_params(stored)
        assert decoded.to_stored() == p and len(decoded.ops) == 2
        pixels, stats = replayer(image, stored)
        assert pixels.shape == (224, 224, 3) and pixels.dtype == np.float32
        assert np.isfinite(pixels).all()
        assert stats.padded_pixels == 0 and not stats.randaugment_skipped


def test_sampling_is_deterministic_per_seed_and_key():
    a = S.sample_aug_params_list(np.random.default_rng(8), 640, 480, 5)
    b = S.sample_aug_params_list(np.random.default_rng(8), 640, 480, 5)
    c = S.sample_aug_params_list(np.random.default_rng(9), 640, 480, 5)
    assert a == b and a != c
    k1 = S.sample_aug_params_list(S.sample_rng(0, "000000084284"), 500, 375, 3)
    assert k1 == S.sample_aug_params_list(S.sample_rng(0, "000000084284"), 500, 375, 3)
    assert k1 != S.sample_aug_params_list(S.sample_rng(0, "000000084285"), 500, 375, 3)
    assert k1 != S.sample_aug_params_list(S.sample_rng(1, "000000084284"), 500, 375, 3)


# ------------------------------------------------------------------------------ config
def test_config_to_dict_matches_datacompdr_config():
    cfg = S.AugSamplingConfig()
    d = cfg.to_dict()
    assert json.loads(json.dumps(d)) == d  # JSON-ready, lists not tuples
    ref = DATACOMPDR_IMAGE_AUGMENTATION
    for name in ("random_resized_crop", "rand_augment"):
        for k, v in ref[name].items():
            assert d[name][k] == v, (name, k)
    # torchvision defaults the released config relies on, made explicit
    assert d["random_resized_crop"]["scale"] == [0.08, 1.0]
    assert d["random_resized_crop"]["ratio"] == [3 / 4, 4 / 3]
    assert (d["rand_augment"]["num_ops"], d["rand_augment"]["magnitude"],
            d["rand_augment"]["num_magnitude_bins"]) == (2, 9, 31)
    assert S.AugSamplingConfig.from_dict(ref) == cfg
    assert S.AugSamplingConfig.from_dict({"reinforce": {"image_augmentation": ref}}) == cfg
    assert S.AugSamplingConfig.from_dict(d) == cfg
    other = S.AugSamplingConfig(crop_size=256, scale=(0.5, 1.0), randaugment_p=0.25)
    assert S.AugSamplingConfig.from_dict(json.loads(json.dumps(other.to_dict()))) == other
    # through the dataset metadata file and back
    meta = DatasetMetadata(teachers=(Teacher("t", 8),), augmentation=d)
    back = DatasetMetadata.from_json_dict(json.loads(json.dumps(meta.to_json_dict())))
    assert S.AugSamplingConfig.from_dict(back.augmentation) == cfg


@pytest.mark.parametrize("kwargs", [
    {"crop_size": 0}, {"scale": (1.0, 0.5)}, {"scale": (0.0, 1.0)}, {"ratio": (2.0, 1.0)},
    {"ratio": "wide"}, {"num_ops": -1}, {"magnitude": 31}, {"magnitude": -1},
    {"num_magnitude_bins": 1}, {"randaugment_p": 1.5}, {"interpolation": "lanczos"},
    {"crop_size": 224.0}])
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError, match="AugSamplingConfig"):
        S.AugSamplingConfig(**kwargs)


def test_bad_inputs_raise():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="image_width"):
        S.sample_aug_params(rng, 0, 10)
    with pytest.raises(ValueError, match="image_height"):
        S.sample_aug_params(rng, 10, 2.5)
    with pytest.raises(ValueError, match="number of augmentations"):
        S.sample_aug_params_list(rng, 10, 10, 0)
    with pytest.raises(ValueError, match="random_resized_crop"):
        S.AugSamplingConfig.from_dict({"rand_augment": {"enable": True}})
    with pytest.raises(ValueError, match="random_horizontal_flip"):
        S.AugSamplingConfig.from_dict({"random_resized_crop": {"size": 224},
                                       "random_horizontal_flip": {"enable": True}})
