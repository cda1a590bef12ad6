"""Add-a-teacher: an open_clip (PyTorch) teacher appended to a dataset made with a zoo teacher.

Checked on both text layouts (DFNDR fp32 ``npz``; legacy DataCompDR bf16 ``pth.gz``): the old
block is bit-identical, every non-embedding member is byte-identical, the new block equals a
fresh generation run with only the new teacher, the metadata names both teachers in order, and
the new teacher's stored embeddings are open_clip's own ``encode_image``/``encode_text`` of the
replayed views and the stored captions.
"""
import os

import numpy as np
import pytest

from conftest import requires_torch
from mobileclip2_jax.data.augment import Replayer
from mobileclip2_jax.data.inspection import inspect_dataset
from mobileclip2_jax.data.pipeline import open_source
from mobileclip2_jax.data.records import decode_image
from mobileclip2_jax.data.tar_index import read_shard_members
from mobileclip2_jax.jobs import reinforce as job
from reinforce_fixture import coco_subset, make_config, open_clip_dir, zoo_checkpoint

pytestmark = requires_torch
N_IMAGES = 6


def _open_clip_teacher_cfg(model_dir):
    from configs.reinforce.common import teacher
    return teacher("open_clip", f"local-dir:{model_dir}", "", batch_size=4, label="tiny-vit")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("add")
    return root, zoo_checkpoint(root / "s0"), open_clip_dir(root / "tiny_vit"), coco_subset(root / "src", N_IMAGES)


def _records(path):
    src = open_source(path)
    return src, [src.decode(src[i]) for i in range(len(src))]


def _members(path):
    out = {}
    for name in sorted(n for n in os.listdir(path) if n.endswith(".tar")):
        for key, m in read_shard_members(os.path.join(path, name)):
            out[key] = {k: v for k, v in m.items() if k not in ("npz", "pth.gz")}
    return out


@pytest.mark.parametrize("layout,fmt", [("dfndr", "npz"), ("datacompdr", "pth.gz")])
def test_add_open_clip_teacher(inputs, layout, fmt):
    root, s0, tiny, (ann, img_dir, _) = inputs
    tag = f"{layout}_{fmt.replace('.', '')}"
    over = {"output.text_emb_layout": layout, "output.embedding_format": fmt}
    base = make_config(root / f"base_{tag}", ann, img_dir, s0, num_augs=2, per_shard=3, **over)
    job.run(base)

    add = make_config(root / f"added_{tag}", ann, img_dir, s0, **over)
    add.mode, add.input_dir = "add_teacher", base.output_dir
    add.teachers = [_open_clip_teacher_cfg(tiny)]
    summary = job.run(add)
    assert summary["shards_made"] == 2 and summary["report"]["num_samples"] == N_IMAGES

    fresh = make_config(root / f"fresh_{tag}", ann, img_dir, s0, num_augs=2, per_shard=3, **over)
    fresh.teachers = [_open_clip_teacher_cfg(tiny)]
    job.run(fresh)

    src_b, before = _records(base.output_dir)
    src_a, after = _records(add.output_dir)
    _, alone = _records(fresh.output_dir)
    meta = src_a.metadata
    assert [t.name for t in meta.teachers] == ["s0-test", "tiny-vit"]
    assert meta.teacher_dims == (512, 32) and meta.blocks() == [(0, 512), (512, 544)]
    assert meta.text_emb_layout == layout and meta.embedding_format == fmt
    assert meta.extra["history"][0]["added_teacher"] == "tiny-vit"
    assert [r.key for r in after] == [r.key for r in before] == [r.key for r in alone]
    for old, new, ref in zip(before, after, alone):
        assert np.array_equal(new.image_emb[:, :512], old.image_emb)        # bit-identical
        assert np.array_equal(new.text_emb[:, :512], old.text_emb)
        np.testing.assert_allclose(new.image_emb[:, 512:], ref.image_emb, atol=1e-6, rtol=0)
        np.testing.assert_allclose(new.text_emb[:, 512:], ref.text_emb, atol=1e-6, rtol=0)
        assert new.syn_text_embs.keys() == old.syn_text_embs.keys()
        for k in old.syn_text_embs:
            assert np.array_equal(new.syn_text_embs[k][:, :512], old.syn_text_embs[k])
            np.testing.assert_allclose(new.syn_text_embs[k][:, 512:], ref.syn_text_embs[k], atol=1e-6, rtol=0)
        assert new.param_aug == old.param_aug and new.captions == old.captions
    assert _members(add.output_dir) == _members(base.output_dir)  # images, captions, augs: same bytes
    assert inspect_dataset(src_a, progress=None)["trainable"]
    if layout == "dfndr":
        _check_against_open_clip(tiny, after[0])
        # an ensemble generated in one run = the zoo run + the added teacher, column for column
        both = make_config(root / f"ensemble_{tag}", ann, img_dir, s0, num_augs=2, per_shard=3, **over)
        both.teachers.append(_open_clip_teacher_cfg(tiny))
        job.run(both)
        src_e, ensemble = _records(both.output_dir)
        assert src_e.metadata.teachers == meta.teachers
        for e, a in zip(ensemble, after):
            np.testing.assert_allclose(e.image_emb, a.image_emb, atol=1e-6, rtol=0)
            np.testing.assert_allclose(e.text_emb, a.text_emb, atol=1e-6, rtol=0)
            np.testing.assert_allclose(e.syn_text_embs["syn_text"], a.syn_text_embs["syn_text"], atol=1e-6, rtol=0)


def _check_against_open_clip(model_dir, rec):
    """The appended block is open_clip's own output on the replayed stored views."""
    import open_clip
    import torch
    net = open_clip.create_model(f"local-dir:{model_dir}").eval()
    cfg = open_clip.get_model_preprocess_cfg(net)
    from mobileclip2_jax.data.preprocess import PreprocessConfig
    rp = Replayer(PreprocessConfig(32, tuple(cfg["mean"]), tuple(cfg["std"]), "bicubic"), "bicubic")
    image = decode_image(rec.image)
    views = np.stack([rp(image, p)[0] for p in rec.param_aug])
    tok = open_clip.get_tokenizer(f"local-dir:{model_dir}")
    with torch.no_grad():
        img = net.encode_image(torch.from_numpy(views).permute(0, 3, 1, 2), normalize=True).numpy()
        txt = net.encode_text(tok(rec.captions + rec.syn_texts["syn_text"]), normalize=True).numpy()
    np.testing.assert_allclose(rec.image_emb[:, 512:], img, atol=1e-5, rtol=0)
    stored_txt = np.concatenate([rec.text_emb, rec.syn_text_embs["syn_text"]])[:, 512:]
    np.testing.assert_allclose(stored_txt, txt, atol=1e-5, rtol=0)


def test_add_teacher_bad_input(inputs, tmp_path):
    root, s0, tiny, (ann, img_dir, _) = inputs
    base = make_config(tmp_path / "base", ann, img_dir, s0, num_augs=1, per_shard=6,
                       **{"source.max_items": 2})
    job.run(base)
    same = make_config(tmp_path / "x", ann, img_dir, s0)
    same.mode, same.input_dir = "add_teacher", base.output_dir  # the zoo teacher again: same label
    with pytest.raises(ValueError, match="already has a teacher named 's0-test'"):
        job.run(same)
    inplace = make_config(base.output_dir, ann, img_dir, s0)
    inplace.mode, inplace.input_dir = "add_teacher", base.output_dir
    inplace.teachers = [_open_clip_teacher_cfg(tiny)]
    with pytest.raises(ValueError, match="output_dir must differ"):
        job.run(inplace)
    missing = make_config(tmp_path / "y", ann, img_dir, s0)
    missing.mode, missing.input_dir = "add_teacher", str(tmp_path / "no_dataset")
    missing.teachers = [_open_clip_teacher_cfg(tiny)]
    with pytest.raises(Exception, match="no_dataset"):
        job.run(missing)
