"""Apple ``mobileclip`` package layout (MobileCLIP-S0 / -B v1) ↔ Flax, against Apple's own code.

Reference: ``tests/fixtures/apple_mobileclip_{s0,b}.*``, recorded by
``tools/record_apple_fixtures.py`` from apple/ml-mobileclip (``tests/fixtures/README.md``):
Apple's state_dict key → shape listings (train form and after ``reparameterize_model``) and
``encode_image``/``encode_text`` outputs for weights regenerated here from the fixture's seed.
No torch needed except for the one test that feeds torch tensors. The MCt text tower's own
parity tests are in ``test_mct_text.py``.
"""
import functools
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "fixtures"))
import deterministic_weights as dw  # noqa: E402

from conftest import requires_torch, torch  # noqa: E402
from mobileclip2_jax.convert.apple_layout import (APPLE_VARIANTS, apple_clip_from_torch,  # noqa: E402
                                                  apple_clip_to_torch, get_apple_variant, is_apple_layout)
from mobileclip2_jax.convert.torch_layout import StateDictMismatchError  # noqa: E402
from mobileclip2_jax.models.reparam import reparameterize  # noqa: E402

MODELS = {"MobileCLIP-S0": "mobileclip_s0", "MobileCLIP-B": "mobileclip_b"}
RTOL = 1e-5


def rel_err(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def n_params(variables):
    return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(variables["params"]))


@functools.lru_cache(maxsize=2)
def reference(variant):
    """(Apple-layout state_dict, its conversion, fixture meta, fixture arrays) of a variant."""
    meta, arrays = dw.load_reference(MODELS[variant])
    sd = dw.reference_weights(meta)
    return sd, apple_clip_from_torch(sd, variant), meta, arrays


@pytest.fixture(scope="module", params=list(MODELS))
def variant(request):
    return request.param


def test_fixture_weights_regenerate_exactly(variant):
    sd, _, meta, _ = reference(variant)
    assert dw.digest(sd) == meta["weights_digest"], "NumPy's generator streams changed: re-record the fixtures"


def test_export_has_apple_keys_and_shapes_in_both_forms(variant):
    sd, conv, meta, _ = reference(variant)
    train = apple_clip_to_torch(conv["image"], conv["text"], conv["logit_scale"], variant)
    assert {k: list(v.shape) for k, v in train.items()} == dict(meta["state_dict_train"])
    assert {k: v.dtype for k, v in train.items()} == {k: v.dtype for k, v in sd.items()}
    fused = apple_clip_to_torch(reparameterize(conv["image"]), reparameterize(conv["text"]),
                                conv["logit_scale"], variant)
    assert {k: list(v.shape) for k, v in fused.items()} == dict(meta["state_dict_reparam"])


def test_round_trips_are_bit_exact(variant):
    sd, conv, _, _ = reference(variant)
    back = apple_clip_to_torch(conv["image"], conv["text"], conv["logit_scale"], variant)
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and np.array_equal(back[k], v), k
    assert conv["inference"] is False
    # Reparameterized form: Flax → Apple (reparameterize_model layout) → Flax.
    fused = (reparameterize(conv["image"]), reparameterize(conv["text"]))
    again = apple_clip_from_torch(apple_clip_to_torch(*fused, conv["logit_scale"], variant), variant)
    assert again["inference"] is (variant == "MobileCLIP-S0")
    for ours, theirs in zip(fused, (again["image"], again["text"])):
        assert jax.tree.structure(ours) == jax.tree.structure(theirs)
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)))


def test_parameter_counts(variant):
    """§6 counts; our image heads carry a (zero) bias that Apple's ``proj`` lacks."""
    _, conv, meta, _ = reference(variant)
    v, counts = APPLE_VARIANTS[variant], meta["param_counts"]
    embed = conv["image"]["params"]["head_fc" if variant == "MobileCLIP-S0" else "head"]["bias"].size
    assert n_params(conv["image"]) == counts["image_train"] + embed
    assert n_params(reparameterize(conv["image"])) == counts["image_reparam"] + embed
    assert n_params(conv["text"]) == counts["text_train"]
    assert n_params(reparameterize(conv["text"])) == counts["text_reparam"]
    expected = {"MobileCLIP-S0": (11.406, 11.357, 42.441), "MobileCLIP-B": (86.349, 86.349, 63.428)}[variant]
    got = (counts["image_train"] + (0 if variant == "MobileCLIP-S0" else embed),
           counts["image_reparam"] + (0 if variant == "MobileCLIP-S0" else embed), counts["text_train"])
    assert tuple(round(c / 1e6, 3) for c in got) == expected
    assert v.image_config.image_size == meta["image_size"]


@pytest.mark.parametrize("variant_form", [("MobileCLIP-S0", "train"), ("MobileCLIP-S0", "reparam"),
                                          ("MobileCLIP-B", "train")])
def test_image_tower_matches_apple_encode_image(variant_form):
    variant, form = variant_form
    _, conv, meta, arrays = reference(variant)
    inference = form == "reparam"
    variables = reparameterize(conv["image"]) if inference else conv["image"]
    images = jnp.asarray(dw.images_for(meta["seed"], meta["n_images"], meta["image_size"]))
    model = APPLE_VARIANTS[variant].image_module(inference_mode=inference)
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(jax.jit(model.apply)(variables, images))
    ref = arrays[f"image_{form}"]
    assert ours.shape == ref.shape == (meta["n_images"], 512)
    assert rel_err(ours, ref) <= RTOL, rel_err(ours, ref)
    if variant == "MobileCLIP-B":   # nothing to fold in ViT-B / base text: Apple's forms agree exactly
        assert np.array_equal(arrays["image_train"], arrays["image_reparam"])


def test_causal_base_text_tower_matches_apple_encode_text():
    _, conv, _, arrays = reference("MobileCLIP-B")
    model = APPLE_VARIANTS["MobileCLIP-B"].text_module()
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(jax.jit(model.apply)(conv["text"], jnp.asarray(arrays["ids"])))
    assert rel_err(ours, arrays["text_train"]) <= RTOL, rel_err(ours, arrays["text_train"])
    assert np.array_equal(arrays["text_train"], arrays["text_reparam"])


def test_strict_loading_names_the_offending_key():
    sd, *_ = reference("MobileCLIP-S0")
    conv_key = "image_encoder.model.network.2.3.token_mixer.mixer.rbr_conv.0.conv.weight"
    text_key = "text_encoder.transformer.5.convffn.fc1.weight"
    pos_key = "text_encoder.positional_embedding.pos_embed.pos_embed"
    cases = [({k: v for k, v in sd.items() if k != conv_key}, rf"missing keys \(1\):\n\s+{conv_key}"),
             ({**sd, text_key: sd[text_key][:, :-1]},
              rf"{text_key}: got \(2048, 511, 1, 1\), expected \(2048, 512, 1, 1\)"),
             ({**sd, pos_key: sd[pos_key][0]}, rf"{pos_key}: got \(1, 77, 512\), expected \(1, 1, 77, 512\)"),
             ({**sd, "image_encoder.model.head.bias": np.zeros(512, np.float32)},
              r"unexpected keys \(1\):\n\s+image_encoder.model.head.bias"),
             ({**sd, "visual.proj": sd["logit_scale"]}, r"unexpected keys \(1\):\n\s+visual.proj"),
             ({k: v for k, v in sd.items() if k != "logit_scale"}, r"missing keys \(1\):\n\s+logit_scale")]
    for bad, pattern in cases:
        with pytest.raises(StateDictMismatchError, match=pattern):
            apple_clip_from_torch(bad, "MobileCLIP-S0")
    with pytest.raises(StateDictMismatchError, match="missing keys"):   # a B checkpoint is not S0
        apple_clip_from_torch(reference("MobileCLIP-B")[0], "MobileCLIP-S0")


def test_export_refuses_a_nonzero_head_bias():
    _, conv, _, _ = reference("MobileCLIP-S0")
    image = jax.tree.map(np.array, conv["image"])
    image["params"]["head_fc"]["bias"][3] = 0.5
    with pytest.raises(ValueError, match=r"head bias is nonzero.*\(head\.proj\) has no bias"):
        apple_clip_to_torch(image, conv["text"], conv["logit_scale"], "MobileCLIP-S0")


def test_layout_detection_and_variant_names():
    sd, *_ = reference("MobileCLIP-S0")
    assert is_apple_layout(sd)
    assert is_apple_layout({"state_dict": {"module." + k: v for k, v in list(sd.items())[:3]}})
    assert not is_apple_layout({"visual.trunk.stem.0.conv_kxk.0.conv.weight": np.zeros(1), "logit_scale": np.zeros(())})
    assert get_apple_variant("mobileclip_b") is APPLE_VARIANTS["MobileCLIP-B"]
    with pytest.raises(ValueError, match="no Apple-package layout for 'MobileCLIP2-S0'"):
        get_apple_variant("MobileCLIP2-S0")


@requires_torch
def test_accepts_wrapped_torch_state_dicts():
    sd, conv, _, _ = reference("MobileCLIP-S0")
    wrapped = {"state_dict": {"module." + k: torch.from_numpy(v) for k, v in sd.items()}}
    again = apple_clip_from_torch(wrapped, "MobileCLIP-S0")
    assert again["logit_scale"] == conv["logit_scale"]
    for tower in ("image", "text"):
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(again[tower]),
                                                        jax.tree.leaves(conv[tower])))
