"""Per-example sampling (``data/sampling.py``): determinism, uniformity, regex, alignment, errors"""
import dataclasses

import numpy as np
import pytest

from mobileclip2_jax.data import sampling as S

D = 8


def _record(n_aug=5, layout="legacy", syn=None, n_gt=1):
    """A record whose embedding rows encode what they belong to, so alignment is checkable:
    image row a = a; GT row c = 100 + c; synthetic caption s of key k = 1000·(k_id+1) + s."""
    syn = syn or {"syn_text": [f"syn {s}" for s in range(4)]}
    keys = sorted(syn)
    rec = {
        "param_aug": [[[a, a, 10, 10], [[0, 0.0], [12, 0.0]]] for a in range(n_aug)],
        "captions": [f"gt {c}" for c in range(n_gt)] if n_gt > 1 else "gt 0",
        "syn_texts": syn,
        "image_emb": np.arange(n_aug, dtype=np.float32)[:, None] * np.ones(D, np.float32),
    }
    gt = (100 + np.arange(n_gt, dtype=np.float32))[:, None] * np.ones(D, np.float32)
    syn_rows = {k: (1000 * (keys.index(k) + 1) + np.arange(len(v), dtype=np.float32))[:, None]
                * np.ones(D, np.float32) for k, v in syn.items()}
    if layout == "legacy":
        assert len(syn) == 1
        rec["text_emb"] = np.concatenate([gt] + list(syn_rows.values()))
    else:
        rec["text_emb"] = gt
        rec["syn_text_embs"] = {f"{k}_emb": v for k, v in syn_rows.items()}
    return rec


def test_deterministic_in_seed_index_epoch():
    rec = _record(n_aug=30)
    cfg = S.SamplingConfig(seed=3)
    forward = [S.sample_record(rec, i, 2, cfg).choice for i in range(200)]
    backward = [S.sample_record(rec, i, 2, cfg).choice for i in reversed(range(200))][::-1]
    assert forward == backward  # order (and so worker layout) does not matter
    assert forward == [S.sample_record(rec, i, 2, S.SamplingConfig(seed=3)).choice
                       for i in range(200)]
    other_seed = [S.sample_record(rec, i, 2, S.SamplingConfig(seed=4)).choice for i in range(200)]
    other_epoch = [S.sample_record(rec, i, 3, cfg).choice for i in range(200)]
    assert forward != other_seed and forward != other_epoch
    # Options that do not use a draw leave the other draws alone.
    mixed = [S.sample_record(rec, i, 2, dataclasses.replace(cfg, mix_synthetic_ratio=0.5)).choice
             for i in range(200)]
    assert [c.aug_index for c in mixed] == [c.aug_index for c in forward]


def test_uniform_over_augmentations_and_captions():
    n_aug, n = 30, 30_000
    syn = {"syn_text": ["a", "b", "c", "d", "e"], "syn_text_b": ["x", "y"]}
    rec = _record(n_aug=n_aug, layout="dfndr", syn=syn)
    choices = [S.sample_record(rec, i).choice for i in range(n)]
    counts = np.bincount([c.aug_index for c in choices], minlength=n_aug)
    expected = n / n_aug
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 70, (chi2, counts)  # 29 dof: P(chi2 > 70) < 1e-4
    keys = np.array([c.syn_key for c in choices])
    assert abs((keys == "syn_text").mean() - 0.5) < 0.02
    five = np.bincount([c.syn_index for c in choices if c.syn_key == "syn_text"], minlength=5)
    assert five.min() > 0.85 * five.mean()


def test_sequential_follows_epoch():
    rec = _record(n_aug=4, n_gt=3)
    cfg = S.SamplingConfig(sequential=True)
    for epoch in range(9):
        c = S.sample_record(rec, 17, epoch, cfg).choice
        assert (c.aug_index, c.caption_index, c.syn_index) == (epoch % 4, epoch % 3, epoch % 4)


def test_regex_filters_synthetic_keys():
    syn = {"syn_text": ["s0"], "syn_text_dfn_mscoco38k": ["d0", "d1"], "blip2_captions": ["b0"],
           "syn_text_empty": []}
    assert S.matching_syn_keys(syn) == ["syn_text", "syn_text_dfn_mscoco38k"]
    assert S.matching_syn_keys(syn, r"^syn_text_dfn_mscoco38k$") == ["syn_text_dfn_mscoco38k"]
    rec = _record(layout="dfndr", syn=syn)
    seen = {S.sample_record(rec, i).choice.syn_key for i in range(300)}
    # The reader's key order does not change the choice.
    flipped = dict(rec, syn_texts=dict(reversed(list(syn.items()))))
    assert [S.sample_record(flipped, i).choice for i in range(50)] == \
        [S.sample_record(rec, i).choice for i in range(50)]
    assert seen == {"syn_text", "syn_text_dfn_mscoco38k"}
    cfg = S.SamplingConfig(syn_text_key_regex=r"^syn_text_dfn_mscoco38k$")
    assert {S.sample_record(rec, i, 0, cfg).choice.syn_key for i in range(50)} == \
        {"syn_text_dfn_mscoco38k"}
    with pytest.raises(ValueError, match="no synthetic-caption key matches"):
        S.sample_record(rec, 0, 0, S.SamplingConfig(syn_text_key_regex=r"^caption$"))
    with pytest.raises(ValueError, match="bad syn_text_key_regex"):
        S.SamplingConfig(syn_text_key_regex="(")


@pytest.mark.parametrize("layout", ["legacy", "dfndr"])
def test_embeddings_align_with_choices(layout):
    syn = {"syn_text": [f"syn {s}" for s in range(5)]}
    if layout == "dfndr":
        syn["syn_text_two"] = ["t0", "t1", "t2"]
    rec = _record(n_aug=7, layout=layout, syn=syn, n_gt=2)
    keys = sorted(syn)
    for i in range(100):
        ex = S.sample_record(rec, i, i % 3)
        c = ex.choice
        assert ex.aug_params == rec["param_aug"][c.aug_index]
        assert ex.image_emb.dtype == np.float32 and ex.image_emb.shape == (D,)
        assert np.all(ex.image_emb == c.aug_index)
        assert ex.caption == f"gt {c.caption_index}"
        assert np.all(ex.text_emb == 100 + c.caption_index)
        assert ex.syn_caption == syn[c.syn_key][c.syn_index]
        assert np.all(ex.syn_text_emb == 1000 * (keys.index(c.syn_key) + 1) + c.syn_index)


def test_array_api_and_dtypes():
    rec = _record(n_aug=3, layout="dfndr")
    ex = S.sample_example(param_aug=rec["param_aug"], captions=["only"], syn_texts=rec["syn_texts"],
                          image_emb=rec["image_emb"].astype(np.float16),
                          text_emb=rec["text_emb"].astype(np.float16),
                          syn_text_embs={"syn_text": rec["syn_text_embs"]["syn_text_emb"]},
                          index=5, epoch=1)
    assert ex.caption == "only"
    assert {a.dtype for a in (ex.image_emb, ex.text_emb, ex.syn_text_emb)} == {np.dtype(np.float32)}

    @dataclasses.dataclass
    class Rec:
        param_aug: list
        captions: str
        syn_texts: dict
        image_emb: np.ndarray
        text_emb: np.ndarray
        syn_text_embs: dict

    assert S.sample_record(Rec(**rec), 5, 1).choice == S.sample_record(rec, 5, 1).choice


def test_mix_synthetic():
    rec = _record(n_aug=3)
    always = S.sample_record(rec, 1, 0, S.SamplingConfig(mix_synthetic_ratio=1.0))
    assert always.caption.startswith("syn") and np.all(always.text_emb >= 1000)
    assert always.syn_caption is None and always.syn_text_emb is None
    never = S.sample_record(rec, 1, 0, S.SamplingConfig(mix_synthetic_ratio=0.0))
    assert never.caption == "gt 0" and never.syn_caption is None
    share = np.mean([S.sample_record(rec, i, 0, S.SamplingConfig(mix_synthetic_ratio=0.3))
                     .choice.syn_replaces_caption for i in range(2000)])
    assert abs(share - 0.3) < 0.04


def test_clear_errors():
    rec = _record(n_aug=4)
    bad = dict(rec, image_emb=rec["image_emb"][:3])
    with pytest.raises(ValueError, match="image_emb has 3 rows but the record stores 4"):
        S.sample_record(bad, 0)
    with pytest.raises(ValueError, match="legacy layout"):
        S.sample_record(dict(rec, text_emb=rec["text_emb"][:3]), 0)
    dfn = _record(layout="dfndr")
    with pytest.raises(ValueError, match="no embeddings for synthetic key 'syn_text'"):
        S.sample_record(dict(dfn, syn_text_embs={}), 0)
    with pytest.raises(ValueError, match="syn_text_emb has shape"):
        S.sample_record(dict(dfn, syn_text_embs={"syn_text_emb": np.zeros((2, D))}), 0)
    with pytest.raises(ValueError, match="dim"):
        S.sample_record(dict(rec, text_emb=np.zeros((5, D + 1))), 0)
    with pytest.raises(ValueError, match="no ground-truth caption"):
        S.sample_record(dict(rec, captions=[]), 0)
    with pytest.raises(ValueError, match="no augmentation"):
        S.sample_record(dict(rec, param_aug=[], image_emb=np.zeros((0, D))), 0)
    with pytest.raises(ValueError, match="record has no 'syn_texts'"):
        S.sample_record({k: v for k, v in rec.items() if k != "syn_texts"}, 0)
    with pytest.raises(ValueError, match="index must be a non-negative"):
        S.sample_record(rec, -1)
    with pytest.raises(ValueError, match="seed"):
        S.SamplingConfig(seed=-2)
    with pytest.raises(ValueError, match="mix_synthetic_ratio"):
        S.SamplingConfig(mix_synthetic_ratio=1.5)
