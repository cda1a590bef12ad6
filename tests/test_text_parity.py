"""Base text tower vs open_clip's ``model.text`` for MobileCLIP2 (non-causal and causal)."""
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import randomize_torch_model, requires_torch, torch
from mobileclip2_jax.convert.text_layout import text_from_torch, text_to_torch
from mobileclip2_jax.models.text import TEXT_CONFIGS, TextTransformer, check_token_ids
from mobileclip2_jax.tokenizers import ClipBpeTokenizer

COCO = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "coco_mini" / "annotations" / "captions_train2017.json"


def captions(n=6):
    if COCO.exists():
        caps = [a["caption"] for a in json.loads(COCO.read_text())["annotations"]][:n - 1]
    else:
        caps = ["a man riding a wave on top of a surfboard"] * (n - 1)
    return caps + ["a very long caption " * 30]  # truncated: EOT at the last position


@requires_torch
@pytest.mark.parametrize("model_name,text_cfg", [("MobileCLIP2-S0", "base512"),
                                                 ("MobileCLIP2-B", "base512_causal"),
                                                 ("MobileCLIP2-S3", "base768")])
def test_text_tower_matches_open_clip(model_name, text_cfg):
    import open_clip
    cfg = TEXT_CONFIGS[text_cfg]
    torch.manual_seed(0)
    model = open_clip.create_model(model_name, pretrained=None).eval()
    randomize_torch_model(model.text, seed=1)
    ids = ClipBpeTokenizer()(captions())
    with torch.no_grad():
        ref = model.encode_text(torch.from_numpy(ids.astype(np.int64)), normalize=False).numpy()
    variables = text_from_torch(model.state_dict(), cfg)   # "text." prefix auto-detected
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(jax.jit(TextTransformer(cfg).apply)(variables, jnp.asarray(ids)))
    assert ours.shape == ref.shape == (len(ids), cfg.embed_dim)
    assert np.abs(ours - ref).max() <= 1e-5 * np.abs(ref).max()
    # Round trip to open_clip layout is bit-exact and loads strictly.
    back = text_to_torch(variables, cfg, prefix="text.")
    full = model.state_dict()
    for k, v in back.items():
        assert np.array_equal(v, full[k].numpy()), k
    assert set(back) == {k for k in full if k.startswith("text.")}


@requires_torch
def test_padding_matters_for_non_causal_towers():
    """Non-causal towers attend to padding, so ids must always be full length, zero-padded:
    the same caption with different pad ids gives a different embedding (causal: identical)."""
    ids = ClipBpeTokenizer()(["a photo of a dog"])
    other_pad = np.where(ids == 0, 1, ids)
    for name, expect_change in (("base512", True), ("base512_causal", False)):
        cfg = TEXT_CONFIGS[name]
        v = jax.jit(TextTransformer(cfg).init)(jax.random.key(0), jnp.asarray(ids))
        a, b = (np.asarray(TextTransformer(cfg).apply(v, jnp.asarray(x))) for x in (ids, other_pad))
        assert (not np.allclose(a, b, atol=1e-6)) == expect_change


def test_rows_without_end_of_text_are_rejected():
    ids = ClipBpeTokenizer()(["a cat", "a dog"])
    ids[1, ids[1] == 49407] = 0
    with pytest.raises(ValueError, match=r"rows \[1\] have no end-of-text token"):
        check_token_ids(ids, 77)
    with pytest.raises(ValueError, match=r"shape \(batch, 77\)"):
        check_token_ids(ids[:, :20], 77)
    cfg = TEXT_CONFIGS["base512"]
    with pytest.raises(ValueError, match="no end-of-text"):
        TextTransformer(cfg).init(jax.random.key(0), ids)  # concrete (non-traced) ids are checked
