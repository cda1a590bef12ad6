"""The current main job (JAX vs timm MCi tower on real photos) and its bad-input handling."""
import pathlib
import shutil

import numpy as np
import pytest

from conftest import requires_torch
from mobileclip2_jax.eval.tower_parity import find_images, load_image, run_tower_parity

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
CLOTHING = SHARED / "clothing" / "test"
needs_data = pytest.mark.skipif(not CLOTHING.is_dir(), reason=f"{CLOTHING} not present")


@needs_data
@requires_torch
def test_parity_job_on_real_photos():
    report = run_tower_parity(str(CLOTHING), "mci0", num_images=4, batch_size=2)
    assert report["images"] == 4
    for form in ("train", "reparameterized"):
        f = report["forms"][form]
        assert f["max_rel_err"] <= 1e-5
        assert f["min_cosine"] >= 1 - 1e-6
        assert f["max_similarity_diff"] <= 1e-5


@needs_data
def test_images_are_spread_over_classes_and_preprocessed():
    files = find_images(str(CLOTHING), 10)
    assert len(files) == 10 and len({f.parent.name for f in files}) == 10
    img = load_image(files[0], 256)
    assert img.shape == (256, 256, 3) and img.dtype == np.float32
    assert 0.0 <= img.min() and img.max() <= 1.0 and img.std() > 0.01


def test_missing_or_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_images(str(tmp_path / "nope"), 4)
    with pytest.raises(FileNotFoundError, match="no images"):
        find_images(str(tmp_path), 4)


@needs_data
def test_corrupt_image_is_named(tmp_path):
    shutil.copy(next(CLOTHING.glob("*/*.jpg")), tmp_path / "good.jpg")
    (tmp_path / "bad.jpg").write_text("not a jpeg")
    with pytest.raises(ValueError, match="cannot decode image .*bad.jpg"):
        [load_image(f, 64) for f in find_images(str(tmp_path), 4)]


def test_file_instead_of_folder_and_bad_counts(tmp_path):
    f = tmp_path / "a.jpg"
    f.write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        find_images(str(f), 4)
    with pytest.raises(ValueError, match="must be >= 1"):
        run_tower_parity(str(tmp_path), num_images=0)
    with pytest.raises(ValueError, match="unknown MCi variant 'mci9'"):
        run_tower_parity(str(tmp_path / "missing"), variant="mci9")  # checked before the folder
