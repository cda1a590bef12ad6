"""Every open_clip-defined variant, end to end through the public API, against open_clip.

For each variant: a random-init open_clip model (randomized BN statistics, affine params and
layer scales; eval mode, fp32) is saved as ``.safetensors`` and loaded with
``mobileclip2_jax.create_model(name, pretrained=file)``. Then
- ``encode_image`` / ``encode_text`` (un-normalized and normalized) are within
  1e-5 × max|ref| of open_clip's, on real photos preprocessed by the variant's own preprocessor;
- ``model.reparameterize()`` matches ``timm.utils.reparameterize_model`` the same way;
- ``model.state_dict()`` equals the original open_clip state_dict bit for bit, and each
  tower's parameter count equals ``sum(p.numel())`` of open_clip's tower.

MobileCLIP-S3/S4/L-14 (v1) are defined by the MobileCLIP2 open_clip configs of the same
architecture (``zoo.py``). MobileCLIP-S0 (v1, MCt text) and Apple's MobileCLIP-B form are
tested against Apple reference fixtures in ``test_apple_layout.py``. Large variants run at
batch 1 and a reduced image size (still every stage / a full ViT) to fit CI time.
"""
import functools
import pathlib

import jax
import numpy as np
import pytest

import mobileclip2_jax
from conftest import randomize_torch_model, requires_torch, torch
from mobileclip2_jax.models.zoo import get_model_spec

pytestmark = requires_torch

DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
RTOL = 1e-5
# variant → (test image size or None for the variant's own, batch)
CASES = {
    "MobileCLIP-S1": (None, 2), "MobileCLIP-S2": (None, 2), "MobileCLIP-B": (None, 2),
    "MobileCLIP-S3": (128, 1), "MobileCLIP-S4": (128, 1), "MobileCLIP-L-14": (112, 1),
    "MobileCLIP2-S0": (None, 2), "MobileCLIP2-S2": (None, 2), "MobileCLIP2-B": (None, 2),
    "MobileCLIP2-S3": (128, 1), "MobileCLIP2-S4": (128, 1), "MobileCLIP2-L-14": (112, 1),
}
CAPTIONS = ["a photo of a red t-shirt", "two dogs playing in the snow, é ñ 🐶",
            "a very long caption " * 30]


@pytest.fixture(autouse=True)
def _release_after_each_test():
    """Each parametrization builds a different large architecture: free it before the next."""
    yield
    from conftest import release_compiled_programs
    release_compiled_programs()


def rel_err(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def photos(n):
    found = sorted((DATA / "clothing").rglob("*.jpg"))
    if len(found) < n:
        pytest.skip(f"shared clothing photos not found under {DATA}")
    return found[:: max(1, len(found) // n)][:n]


@functools.lru_cache(maxsize=1)
def reference(name, tmp_dir):
    """open_clip model (train form, reparameterized copy), the saved file, inputs, outputs."""
    import open_clip
    from timm.utils.model import reparameterize_model
    from safetensors.torch import save_file
    spec = get_model_spec(name)
    size, batch = CASES[name]
    torch.manual_seed(0)
    kwargs = {"force_image_size": size} if size else {}
    model = open_clip.create_model(spec.open_clip_name, pretrained=None, **kwargs).eval()
    randomize_torch_model(model, seed=1)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = pathlib.Path(tmp_dir) / f"{name}.safetensors"
    save_file(sd, str(path))
    return model, reparameterize_model(model), path, {k: v.numpy() for k, v in sd.items()}


@pytest.fixture(scope="module")
def tmp_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("zoo"))


@pytest.mark.parametrize("name", list(CASES))
def test_variant_matches_open_clip(name, tmp_dir):
    spec = get_model_spec(name)
    size, batch = CASES[name]
    model_ref, fused_ref, path, sd = reference(name, tmp_dir)
    model, _, preprocess = mobileclip2_jax.create_model_and_transforms(name, pretrained=path, image_size=size)
    assert model.name == spec.name and not model.inference_mode

    # Preprocessing: the variant's own constants; the same pixels go to both models.
    assert preprocess.config.mean == spec.preprocess.mean and preprocess.config.std == spec.preprocess.std
    images = preprocess.batch(photos(batch))
    ids = mobileclip2_jax.get_tokenizer(name)(CAPTIONS)
    x_t = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    ids_t = torch.from_numpy(ids.astype(np.int64))
    with torch.no_grad():
        ref_img = model_ref.encode_image(x_t).numpy()
        ref_txt = model_ref.encode_text(ids_t).numpy()
        ref_img_fused = fused_ref.encode_image(x_t).numpy()
        ref_img_n = model_ref.encode_image(x_t, normalize=True).numpy()

    with jax.default_matmul_precision("highest"):
        img = model.encode_image(images, normalize=False)
        txt = model.encode_text(ids, normalize=False)
        img_n = model.encode_image(images)
        fused = model.reparameterize()
        img_fused = fused.encode_image(images, normalize=False)
        txt_fused = fused.encode_text(ids, normalize=False)
    errs = {"image": rel_err(img, ref_img), "text": rel_err(txt, ref_txt),
            "image normalized": rel_err(img_n, ref_img_n),
            "image reparameterized": rel_err(img_fused, ref_img_fused),
            "text reparameterized": rel_err(txt_fused, ref_txt)}
    assert max(errs.values()) <= RTOL, errs
    np.testing.assert_allclose(np.linalg.norm(np.asarray(img_n), axis=-1), 1.0, rtol=1e-6)

    # torch → Flax → torch is bit-exact, key for key.
    back = model.state_dict()
    assert sorted(back) == sorted(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and np.array_equal(back[k], v), k

    # Tower parameter counts equal the reference's.
    n_img = sum(p.numel() for p in model_ref.visual.parameters())
    n_txt = sum(p.numel() for n, p in model_ref.named_parameters() if n.startswith("text."))
    assert model.param_counts() == (n_img, n_txt)
    assert fused.param_counts()[0] == sum(p.numel() for p in fused_ref.visual.parameters())
