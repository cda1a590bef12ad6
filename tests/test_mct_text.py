"""MCt text tower (MobileCLIP-S0 v1) against outputs recorded from Apple's ``mobileclip`` code.

The reference outputs come from ``tests/fixtures/apple_mobileclip_s0.*`` (how they were made:
``tests/fixtures/README.md``); the weights are regenerated from the fixture's seed, so no torch
is needed. Tolerance: max|ours − Apple| ≤ 1e-5 · max|Apple|.
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

from mobileclip2_jax.convert.apple_layout import apple_text_from_torch  # noqa: E402
from mobileclip2_jax.models.mct_text import MCtConfig, MCtTextTransformer  # noqa: E402
from mobileclip2_jax.models.reparam import reparameterize  # noqa: E402
from mobileclip2_jax.tokenizers import ClipBpeTokenizer  # noqa: E402

CFG = MCtConfig()
RTOL = 1e-5


def rel_err(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def n_params(variables):
    return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(variables["params"]))


def abstract(inference):
    ids = jax.ShapeDtypeStruct((1, 77), jnp.int32)
    return jax.eval_shape(MCtTextTransformer(CFG, inference_mode=inference).init, jax.random.key(0), ids)


@functools.lru_cache(maxsize=1)
def reference():
    """(train-form variables converted from the Apple layout, fixture meta, fixture arrays)."""
    meta, arrays = dw.load_reference("mobileclip_s0")
    sd = dw.reference_weights(meta, prefix="text_encoder.")
    return apple_text_from_torch(sd, "MobileCLIP-S0"), meta, arrays


def encode(variables, ids, inference=False):
    with jax.default_matmul_precision("highest"):
        return np.asarray(jax.jit(MCtTextTransformer(CFG, inference_mode=inference).apply)(
            variables, jnp.asarray(ids)))


def test_parameter_counts_match_apple():
    _, meta, _ = reference()
    train, fused = n_params(abstract(False)), n_params(abstract(True))
    assert (train, fused) == (meta["param_counts"]["text_train"], meta["param_counts"]["text_reparam"])
    assert (round(train / 1e6, 3), round(fused / 1e6, 3)) == (42.441, 42.435)


@pytest.mark.parametrize("form", ["train", "reparam"])
def test_matches_apple_encode_text(form):
    variables, _, arrays = reference()
    inference = form == "reparam"
    if inference:
        variables = reparameterize(variables)
        assert jax.tree.structure(variables) == jax.tree.structure(abstract(True))
    ours = encode(variables, arrays["ids"], inference)
    ref = arrays[f"text_{form}"]
    assert ours.shape == ref.shape == (len(arrays["ids"]), CFG.embed_dim)
    assert rel_err(ours, ref) <= RTOL, rel_err(ours, ref)


def test_padding_and_tokens_after_eot_matter():
    """Non-causal: no attention mask and 11-tap convolutions along the sequence, so tokens
    after end-of-text (padding) change the pooled feature. Always encode at length 77."""
    variables, _, _ = reference()
    ids = ClipBpeTokenizer()(["a photo of a dog"])
    eot = int(ids[0].argmax())
    other_pad = np.where(ids == 0, 1, ids)
    near = ids.copy()
    near[0, eot + 3] = 320                       # one token inside the RepMixer's reach
    far = ids.copy()
    far[0, -1] = 320                             # reaches the pooled token only via attention
    base = encode(variables, np.concatenate([ids, other_pad, near, far]))
    for row in (1, 2, 3):
        assert rel_err(base[row], base[0]) > 1e-3, row


def test_rejects_bad_token_ids():
    variables, _, _ = reference()
    model = MCtTextTransformer(CFG)
    ids = ClipBpeTokenizer()(["a cat", "a dog"])
    with pytest.raises(ValueError, match=r"shape \(batch, 77\)"):
        model.apply(variables, ids[:, :20])
    no_eot = ids.copy()
    no_eot[1, no_eot[1] == 49407] = 0
    with pytest.raises(ValueError, match=r"rows \[1\] have no end-of-text token"):
        model.apply(variables, no_eot)


def test_train_mode_uses_batch_statistics():
    """``train=True`` normalizes with batch statistics and updates the running estimates."""
    variables, _, _ = reference()
    ids = jnp.asarray(ClipBpeTokenizer()(["a cat on a mat", "two dogs playing in the snow"]))
    step = jax.jit(lambda v, x: MCtTextTransformer(CFG).apply(v, x, train=True, mutable=["batch_stats"]))
    out, updates = step(variables, ids)
    assert out.shape == (2, CFG.embed_dim) and np.isfinite(np.asarray(out)).all()
    old = variables["batch_stats"]["transformer_0"]["token_mixer"]["mixer"]["identity"]["mean"]
    new = updates["batch_stats"]["transformer_0"]["token_mixer"]["mixer"]["identity"]["mean"]
    assert not np.allclose(old, new)
    assert rel_err(out, encode(variables, ids)) > 1e-3
