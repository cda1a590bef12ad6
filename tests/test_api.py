"""The open_clip-style public API: zoo, preprocessing, tokenizer, model object, bad input."""
import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import mobileclip2_jax
from conftest import requires_torch
from mobileclip2_jax.convert.torch_layout import StateDictMismatchError
from mobileclip2_jax.data.preprocess import OPENAI_MEAN, ImagePreprocessor, PreprocessConfig
from mobileclip2_jax.models.text import TEXT_CONFIGS, TextTransformer
from mobileclip2_jax.models.zoo import get_model_spec

DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
ALL = ["MobileCLIP-S0", "MobileCLIP-S1", "MobileCLIP-S2", "MobileCLIP-B", "MobileCLIP-S3",
       "MobileCLIP-S4", "MobileCLIP-L-14", "MobileCLIP2-S0", "MobileCLIP2-S2", "MobileCLIP2-B",
       "MobileCLIP2-S3", "MobileCLIP2-S4", "MobileCLIP2-L-14"]


def test_list_models_and_lookup():
    assert mobileclip2_jax.list_models() == ALL
    assert get_model_spec("mobileclip2_s0").name == "MobileCLIP2-S0"
    assert get_model_spec("MobileCLIP2-L/14").name == "MobileCLIP2-L-14"
    with pytest.raises(ValueError, match="unknown model 'MobileCLIP2-S9'.*MobileCLIP2-S0.*MobileCLIP2-L-14"):
        mobileclip2_jax.create_model("MobileCLIP2-S9")
    with pytest.raises(ValueError, match="known models"):
        mobileclip2_jax.get_tokenizer("ViT-B-32")


def test_variant_constants():
    """architecture.md §1/§2.5: towers, embed dims and preprocessing per variant."""
    towers = {s: (get_model_spec(s).image_tower, get_model_spec(s).text_tower) for s in ALL}
    assert towers["MobileCLIP-S0"] == ("mci0", "mct")
    assert towers["MobileCLIP2-S0"] == ("mci0", "base512")
    assert towers["MobileCLIP-B"] == towers["MobileCLIP2-B"] == ("vit_b16_mci", "base512_causal")
    assert towers["MobileCLIP-S4"] == towers["MobileCLIP2-S4"] == ("mci4", "base768")
    assert towers["MobileCLIP2-L-14"] == ("vit_l14", "base768")
    for name in ALL:
        p = get_model_spec(name).preprocess
        raw = name in ("MobileCLIP-S0", "MobileCLIP-S1", "MobileCLIP-S2", "MobileCLIP-B",
                       "MobileCLIP2-S0", "MobileCLIP2-S2", "MobileCLIP2-B")
        assert (p.mean, p.std) == (((0.0,) * 3, (1.0,) * 3) if raw else (OPENAI_MEAN, p.std)), name
        assert p.image_size == (224 if name.endswith(("B", "L-14")) else 256), name
        assert p.interpolation == ("bicubic" if name.endswith("L-14") else "bilinear"), name
        assert get_model_spec(name).embed_dim == (768 if name.endswith(("S3", "S4", "L-14")) else 512)


@requires_torch
@pytest.mark.parametrize("name", ["MobileCLIP2-S0", "MobileCLIP2-S3", "MobileCLIP2-L-14"])
def test_preprocess_equals_open_clip_transform(name):
    """Same pixels, bit for bit, as open_clip's eval transform with the variant's registry cfg."""
    from mobileclip2_jax.convert.torch_env import ensure_torchvision_importable
    ensure_torchvision_importable()
    from open_clip.transform import image_transform
    cfg = get_model_spec(name).preprocess
    ref = image_transform(cfg.image_size, is_train=False, mean=cfg.mean, std=cfg.std,
                          interpolation=cfg.interpolation, resize_mode=cfg.resize_mode)
    ours = ImagePreprocessor(cfg)
    files = sorted((DATA / "clothing").rglob("*.jpg"))[:3] + sorted((DATA / "coco_mini").rglob("*.jpg"))[:3]
    if len(files) < 2:
        pytest.skip("shared photos not found")
    images = [Image.open(f) for f in files] + [Image.new("RGB", (300, 1000), (10, 200, 30)),
                                               Image.new("L", (cfg.image_size, 500), 77)]
    for img in images:
        expected = ref(img).numpy().transpose(1, 2, 0)
        got = ours(img)
        assert got.shape == (cfg.image_size, cfg.image_size, 3)
        np.testing.assert_array_equal(got, expected)


def test_preprocess_bad_input(tmp_path):
    pre = ImagePreprocessor(PreprocessConfig(64))
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        pre(tmp_path / "nope.jpg")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="cannot decode image .*bad.jpg"):
        pre(bad)
    with pytest.raises(ValueError, match="HWC uint8"):
        pre(np.zeros((3, 64, 64), np.float32))
    with pytest.raises(ValueError, match="interpolation"):
        PreprocessConfig(64, interpolation="lanczos5")


@pytest.fixture(scope="module")
def s0():
    return mobileclip2_jax.create_model_and_transforms("MobileCLIP2-S0")


def test_model_object(s0):
    model, preprocess_train, preprocess = s0
    assert [round(n / 1e6, 3) for n in model.param_counts()] == [11.407, 63.428]  # architecture.md §6
    assert np.isclose(model.logit_scale, 1 / 0.07, rtol=1e-6)
    tok = mobileclip2_jax.get_tokenizer("MobileCLIP2-S0")
    files = sorted((DATA / "clothing").rglob("*.jpg"))[:2] or [Image.new("RGB", (300, 200))] * 2
    x = preprocess.batch(files)
    assert preprocess_train(files[0]).shape == x.shape[1:]
    img, txt = model.encode_image(x), model.encode_text(tok(["a shirt", "a dog"]))
    assert img.shape == txt.shape == (2, 512)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(img), axis=-1), 1, rtol=1e-6)
    raw = model.encode_image(jnp.asarray(x), normalize=False)
    np.testing.assert_allclose(np.asarray(img), np.asarray(raw) / np.linalg.norm(raw, axis=-1, keepdims=True),
                               rtol=1e-5, atol=1e-7)
    out = model(x, tok(["a shirt", "a dog"]))
    assert set(out) == {"image_features", "text_features", "logit_scale"}
    fused = model.reparameterize()
    assert fused.inference_mode and not model.inference_mode
    assert fused.param_counts()[0] < model.param_counts()[0]
    np.testing.assert_allclose(np.asarray(fused.encode_image(x)), np.asarray(img), atol=1e-5)


def test_model_bad_input(s0):
    model = s0[0]
    tok = mobileclip2_jax.get_tokenizer("MobileCLIP2-S0")
    ids = tok(["a cat"])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.encode_text(np.where(ids == 0, 49408, ids))
    with pytest.raises(ValueError, match=r"shape \(batch, 77\)"):
        model.encode_text(ids[:, :20])
    with pytest.raises(ValueError, match="no end-of-text"):
        model.encode_text(np.where(ids == 49407, 1, ids))
    with pytest.raises(ValueError, match="NCHW"):
        model.encode_image(np.zeros((1, 3, 256, 256), np.float32))
    with pytest.raises(ValueError, match="must be float"):
        model.encode_image(np.zeros((1, 256, 256, 3), np.uint8))


def test_orbax_round_trip_and_checkpoint_errors(s0, tmp_path):
    model = s0[0]
    saved = model.save(tmp_path / "ckpt")
    with pytest.raises(FileExistsError, match="already holds a checkpoint"):
        model.save(saved)
    loaded = mobileclip2_jax.create_model("MobileCLIP2-S0", pretrained=saved)
    for a, b in zip(jax.tree.leaves(model.variables), jax.tree.leaves(loaded.variables)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="holds a MobileCLIP2-S0 checkpoint, not MobileCLIP2-S2"):
        mobileclip2_jax.create_model("MobileCLIP2-S2", pretrained=saved)
    with pytest.raises(ValueError, match="never downloads"):
        mobileclip2_jax.create_model("MobileCLIP2-S0", pretrained="dfndr2b")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        mobileclip2_jax.create_model("MobileCLIP2-S0", pretrained=tmp_path / "missing.safetensors")
    # A truncated safetensors file and one of another variant: clear errors.
    from safetensors.numpy import save_file
    sd = model.state_dict()
    good = tmp_path / "s0.safetensors"
    save_file(sd, str(good))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(ValueError, match="cut.safetensors: not a readable safetensors file"):
        mobileclip2_jax.create_model("MobileCLIP2-S0", pretrained=cut)
    with pytest.raises(StateDictMismatchError, match=r"stem\.0\.conv_kxk\.0\.conv\.weight: got \(64, 3, 3, 3\), "
                                                     r"expected \(80, 3, 3, 3\)"):
        mobileclip2_jax.create_model("MobileCLIP2-S2", pretrained=good)
    # And the open_clip file written from our weights loads back bit-exactly.
    again = mobileclip2_jax.create_model("MobileCLIP2-S0", pretrained=good)
    for a, b in zip(jax.tree.leaves(model.variables), jax.tree.leaves(again.variables)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("name,changes", [("base512", True), ("base512_causal", False)])
def test_trimming_trailing_padding(name, changes):
    """The reference has no padding mask: a non-causal tower attends to the pad positions, so
    encoding a caption at a trimmed length (20 instead of 77, same weights) changes its
    embedding — which is why the API requires the full context. A causal tower never looks
    past the end-of-text token, so trimming does not change it."""
    cfg = TEXT_CONFIGS[name]
    ids = mobileclip2_jax.get_tokenizer("MobileCLIP2-S0")(["a photo of a red dress"])
    v = jax.jit(TextTransformer(cfg).init)(jax.random.key(0), jnp.asarray(ids))
    short_cfg = dataclasses.replace(cfg, context_length=20)
    v_short = jax.tree.map(lambda x: x, v)
    v_short["params"]["positional_embedding"] = v["params"]["positional_embedding"][:20]
    full = np.asarray(TextTransformer(cfg).apply(v, ids))
    trimmed = np.asarray(TextTransformer(short_cfg).apply(v_short, ids[:, :20]))
    rel = np.abs(full - trimmed).max() / np.abs(full).max()
    # fp32 summation order differs with the length: "unchanged" means ≤ 1e-5 of the max
    assert (rel > 1e-2) if changes else (rel <= 1e-5), rel


def test_readme_zero_shot_example_runs(capsys, monkeypatch):
    """The README's zero-shot block, executed as written (from the project root)."""
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("<!-- readme-example: zero-shot -->", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    if not (DATA / "clothing").exists():
        pytest.skip("shared clothing photos not found")
    monkeypatch.chdir(pathlib.Path(__file__).resolve().parents[1])
    exec(compile(block, "README.md", "exec"), {})
    out = capsys.readouterr().out
    probs = eval(out.strip().splitlines()[-1])
    assert len(probs) == 10 and abs(sum(probs.values()) - 1) < 0.01


@pytest.mark.parametrize("name,apple_model", [("MobileCLIP-S0", "mobileclip_s0"), ("MobileCLIP-B", "mobileclip_b")])
def test_apple_checkpoint_through_the_api(name, apple_model, tmp_path):
    """An Apple-package checkpoint file → create_model → outputs recorded from Apple's own code
    (fixtures: ``tests/fixtures/README.md``), in train and reparameterized form; the Apple
    form of the towers is selected automatically; export back is bit-exact."""
    import sys
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "fixtures"))
    import deterministic_weights as dw
    from safetensors.numpy import save_file
    meta, ref = dw.load_reference(apple_model)
    sd = dw.reference_weights(meta)
    path = tmp_path / f"{apple_model}.safetensors"
    save_file(sd, str(path))
    model = mobileclip2_jax.create_model(name, pretrained=path)
    assert model.apple_form and (name != "MobileCLIP-B" or model.image_config.stem_padding == 1)
    images = dw.images_for(meta["seed"], meta["n_images"], meta["image_size"])
    with jax.default_matmul_precision("highest"):
        outs = {"image_train": model.encode_image(images, normalize=False),
                "text_train": model.encode_text(ref["ids"], normalize=False)}
        fused = model.reparameterize()
        outs["image_reparam"] = fused.encode_image(images, normalize=False)
        outs["text_reparam"] = fused.encode_text(ref["ids"], normalize=False)
    for k, v in outs.items():
        err = np.abs(np.asarray(v) - ref[k]).max() / np.abs(ref[k]).max()
        assert err <= 1e-5, (k, err)
    back = model.state_dict(layout="apple")
    assert set(back) == set(sd) and all(np.array_equal(back[k], sd[k]) for k in sd)
    with pytest.raises(ValueError, match="layout='apple'"):
        model.state_dict()  # open_clip computes a different function for Apple's B form


@requires_torch
def test_torch_pt_checkpoints(s0, tmp_path):
    """``.pt`` files: ``{"state_dict": {"module.…"}}`` wrappers unwrapped, read with
    ``weights_only=True`` — a pickle with foreign globals is refused, not executed."""
    import torch
    model = s0[0]
    sd = {f"module.{k}": torch.from_numpy(v) for k, v in model.state_dict().items()}
    path = tmp_path / "wrapped.pt"
    torch.save({"state_dict": sd, "epoch": 3}, path)
    loaded = mobileclip2_jax.create_model("MobileCLIP2-S0", pretrained=path)
    for a, b in zip(jax.tree.leaves(model.variables), jax.tree.leaves(loaded.variables)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    evil = tmp_path / "evil.pt"
    import argparse  # an importable class that is not on the weights-only allowlist
    torch.save({"state_dict": sd, "args": argparse.Namespace(lr=0.1)}, evil)
    with pytest.raises(ValueError, match="evil.pt: cannot load as a weights-only PyTorch checkpoint"):
        mobileclip2_jax.create_model("MobileCLIP2-S0", pretrained=evil)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ValueError, match="cut.pt: cannot load"):
        mobileclip2_jax.create_model("MobileCLIP2-S0", pretrained=cut)
