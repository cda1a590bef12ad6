"""Strict state_dict loading/exporting for the MCi towers (numpy only, no torch needed)."""
import functools

import jax
import numpy as np
import pytest

from mobileclip2_jax.convert.mci_layout import (mci_abstract_variables, mci_from_torch, mci_key_table,
                                                mci_to_torch)
from mobileclip2_jax.convert.torch_layout import StateDictMismatchError, normalize_state_dict
from mobileclip2_jax.models.mci import get_mci_config


@functools.lru_cache(maxsize=None)
def fake_state_dict(variant, inference=False):
    """A timm-layout state_dict with distinct values per tensor, built from our own export."""
    cfg = get_mci_config(variant)
    abstract = mci_abstract_variables(cfg, inference)
    leaves, treedef = jax.tree.flatten(abstract)
    rng = np.random.default_rng(0)
    values = [rng.standard_normal(l.shape).astype(np.float32) for l in leaves]
    return mci_to_torch(jax.tree.unflatten(treedef, values), cfg, inference=inference)


def test_key_table_has_timm_key_count():
    # 784 visual.trunk entries in open_clip MobileCLIP2-S0 incl. 114 num_batches_tracked
    # (state_dict_keys.md); the table holds everything but num_batches_tracked.
    assert len(mci_key_table(get_mci_config("mci0"))) == 784 - 114
    sd = fake_state_dict("mci0")
    assert len(sd) == 784
    assert sum(k.endswith("num_batches_tracked") for k in sd) == 114


def test_round_trip_numpy_is_bit_exact():
    sd = fake_state_dict("mci0")
    back = mci_to_torch(mci_from_torch(sd, "mci0"), "mci0")
    assert set(back) == set(sd) and all(np.array_equal(back[k], sd[k]) for k in sd)


def test_wrappers_prefixes_and_num_batches_tracked_are_handled():
    sd = fake_state_dict("mci0")
    wrapped = {"state_dict": {"module.visual.trunk." + k: v for k, v in sd.items()}, "epoch": 3}
    variables = mci_from_torch(wrapped, "mci0")
    plain = mci_from_torch({k: v for k, v in sd.items() if "num_batches" not in k}, "mci0")
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(plain)):
        assert np.array_equal(a, b)
    # Other open_clip keys (text tower, logit_scale) are outside the prefix and ignored.
    with_text = dict(wrapped["state_dict"], **{"module.text.token_embedding.weight": np.zeros(3),
                                                "module.logit_scale": np.zeros(())})
    mci_from_torch(with_text, "mci0")


def test_reparameterized_state_dict_is_detected():
    sd = fake_state_dict("mci0", inference=True)
    assert any("reparam_conv" in k for k in sd)
    variables = mci_from_torch(sd, "mci0")
    assert "reparam_conv" in variables["params"]["stem_0"]


def test_other_variant_is_rejected_with_key_lists():
    with pytest.raises(StateDictMismatchError) as e:
        mci_from_torch(fake_state_dict("mci1"), "mci0")
    msg = str(e.value)
    assert "mci0 (train form)" in msg
    assert "unexpected keys" in msg and "stages.0.blocks.2.token_mixer" in msg
    with pytest.raises(StateDictMismatchError) as e:
        mci_from_torch(fake_state_dict("mci2"), "mci0")
    msg = str(e.value)
    assert "mis-shaped keys" in msg
    assert "stem.0.conv_kxk.0.conv.weight: got (80, 3, 3, 3), expected (64, 3, 3, 3)" in msg
    assert "... and" in msg  # long lists are truncated with a count


def test_missing_and_unexpected_keys_are_named():
    sd = dict(fake_state_dict("mci0"))
    del sd["final_conv.se.fc1.weight"]
    sd["head.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(StateDictMismatchError) as e:
        mci_from_torch(sd, "mci0")
    msg = str(e.value)
    assert "missing keys (1):\n    final_conv.se.fc1.weight" in msg
    assert "unexpected keys (1):\n    head.extra.weight" in msg


def test_export_rejects_incomplete_or_extra_variables():
    variables = mci_from_torch(fake_state_dict("mci0"), "mci0")
    broken = jax.tree.map(lambda x: x, variables)
    del broken["params"]["head_fc"]["bias"]
    broken["params"]["stray"] = {"kernel": np.zeros(2)}
    with pytest.raises(StateDictMismatchError) as e:
        mci_to_torch(broken, "mci0")
    assert "params/head_fc/bias" in str(e.value) and "params/stray/kernel" in str(e.value)


def test_normalize_rejects_non_mapping():
    with pytest.raises(TypeError, match="state_dict mapping"):
        normalize_state_dict([1, 2])


def test_reparameterize_is_pure_and_jittable():
    from mobileclip2_jax.models.reparam import reparameterize
    variables = jax.tree.map(np.asarray, mci_from_torch(fake_state_dict("mci0"), "mci0"))
    before = jax.tree.map(np.copy, variables)
    eager = reparameterize(variables)
    jitted = jax.jit(reparameterize)(variables)
    assert jax.tree.structure(eager) == jax.tree.structure(jitted)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(before)):
        assert np.array_equal(a, b)  # inputs untouched
    # The folded tree matches the inference-form key table exactly.
    mci_to_torch(eager, "mci0", inference=True)
