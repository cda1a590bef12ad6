"""Dataset generation (``data/reinforce.py``, ``launch/reinforce.py``) on real COCO photos.

The teacher is a MobileCLIP2-S0 (random weights, 64 px) loaded from an Orbax checkpoint, as a
user's trained teacher would be. Checked: replaying every stored augmentation and re-running the
teacher through the public API reproduces the stored image embedding (1e-5); stored text rows
are the teacher's ``encode_text`` of the stored captions; the stored augmentations are the
seeded draws; the output trains (inspector + Grain pipeline); a corrupt image is skipped and
reported while the run completes; a rerun with another configuration is refused.
"""
import io
import json
import os

import numpy as np
import pytest

from mobileclip2_jax.data.aug_sampling import AugSamplingConfig, sample_aug_params_list, sample_rng
from mobileclip2_jax.data.augment import Replayer
from mobileclip2_jax.data.inspection import inspect_dataset
from mobileclip2_jax.data.pipeline import PipelineConfig, ReinforcedPipeline, open_source
from mobileclip2_jax.data.preprocess import PreprocessConfig
from mobileclip2_jax.data.records import SchemaError, decode_image
from mobileclip2_jax.data.reinforce import shard_report_path
from mobileclip2_jax.jobs import reinforce as job
from mobileclip2_jax.tokenizers.clip_bpe import ClipBpeTokenizer
from reinforce_fixture import TEACHER_SIZE, coco_subset, make_config, zoo_checkpoint

N_IMAGES, N_AUG = 10, 3


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    return zoo_checkpoint(tmp_path_factory.mktemp("teacher") / "s0")


@pytest.fixture(scope="module")
def generated(tmp_path_factory, teacher_ckpt):
    root = tmp_path_factory.mktemp("coco")
    ann, img_dir, images = coco_subset(root / "src", N_IMAGES)
    cfg = make_config(root / "out", ann, img_dir, teacher_ckpt, num_augs=N_AUG, per_shard=4)
    summary = job.run(cfg)
    return cfg, summary, images


def test_stored_embeddings_are_the_teachers_outputs_on_replayed_views(generated, teacher_ckpt):
    cfg, summary, images = generated
    assert summary["shards_made"] == 3 and summary["report"]["num_samples"] == N_IMAGES
    from mobileclip2_jax.factory import create_model, get_tokenizer
    # the form the metadata records ("reparameterized"), through the public API
    teacher = create_model("MobileCLIP2-S0", pretrained=teacher_ckpt, image_size=TEACHER_SIZE).reparameterize()
    tok = get_tokenizer("MobileCLIP2-S0")
    replayer = Replayer(PreprocessConfig(TEACHER_SIZE), "bicubic")  # v2 S0: raw [0, 1] pixels
    source = open_source(cfg.output_dir)
    assert len(source) == N_IMAGES
    captions_by_file = {}
    with open(cfg.source.annotations) as f:
        ann = json.load(f)
    for a in ann["annotations"]:
        captions_by_file.setdefault(a["image_id"], []).append(a["caption"].strip())
    max_img = max_txt = 0.0
    for i in range(len(source)):
        rec = source.decode(source[i])
        im = images[i]
        assert rec.key == os.path.splitext(im["file_name"])[0]
        image = decode_image(rec.image)
        # the stored augmentations are the (seed, key) draws at the stored image's size
        expect = sample_aug_params_list(sample_rng(0, rec.key), image.width, image.height, N_AUG,
                                        AugSamplingConfig())
        assert rec.param_aug == expect
        views = np.stack([replayer(image, p)[0] for p in rec.param_aug])
        ref = np.asarray(teacher.encode_image(views))
        max_img = max(max_img, float(np.abs(ref - rec.image_emb).max()))
        caps = captions_by_file[im["id"]]
        assert rec.captions == caps[:1] and rec.syn_texts == {"syn_text": caps[1:]}
        ref_gt = np.asarray(teacher.encode_text(tok(rec.captions)))
        ref_syn = np.asarray(teacher.encode_text(tok(rec.syn_texts["syn_text"])))
        max_txt = max(max_txt, float(np.abs(ref_gt - rec.text_emb).max()),
                      float(np.abs(ref_syn - rec.syn_text_embs["syn_text"]).max()))
        assert rec.extra["width"] == image.width and rec.extra["image_id"] == im["id"]
    assert max_img <= 1e-5, max_img
    assert max_txt <= 1e-5, max_txt


def test_output_is_a_complete_trainable_dataset(generated):
    cfg, _, _ = generated
    out = cfg.output_dir
    meta = json.load(open(os.path.join(out, "reinforced_metadata.json")))
    assert [t["name"] for t in meta["teachers"]] == ["s0-test"] and meta["embed_dim"] == 512
    assert meta["num_samples"] == N_IMAGES and meta["text_emb_layout"] == "dfndr"
    assert meta["augmentation"]["num_augs"] == N_AUG
    assert meta["augmentation"]["rand_augment"]["num_ops"] == 2
    assert meta["augmentation"]["rand_augment"]["magnitude"] == 9
    assert meta["extra"]["teacher_details"][0]["checkpoint"] == cfg.teachers[0].checkpoint
    manifest = [json.loads(line) for line in open(os.path.join(out, "manifest.jsonl"))]
    assert manifest == [{"shard": "00000000", "num_uids": 4}, {"shard": "00000001", "num_uids": 4},
                        {"shard": "00000002", "num_uids": 2}]
    report = inspect_dataset(open_source(out), progress=None)
    assert report["trainable"] and report["good_samples"] == N_IMAGES
    assert report["synthetic_captions_per_sample"]["syn_text"]["min"] == 4
    s = report["image_emb_norm_per_teacher"]["s0-test"]
    assert abs(s["min"] - 1) < 1e-5 and abs(s["max"] - 1) < 1e-5
    pipeline = ReinforcedPipeline(open_source(out), PipelineConfig(
        global_batch_size=4, preprocess=PreprocessConfig(32)), ClipBpeTokenizer())
    batch = next(iter(pipeline.host_iterator()))
    assert batch["image"].shape == (4, 32, 32, 3) and batch["image_emb"].shape == (4, 512)


def test_rerun_skips_finished_shards_and_refuses_another_config(generated):
    cfg, _, _ = generated
    before = {n: os.path.getmtime(os.path.join(cfg.output_dir, n)) for n in os.listdir(cfg.output_dir)
              if n.endswith(".tar")}
    summary = job.run(cfg)
    assert summary["shards_made"] == 0 and summary["shards_already_finished"] == 3
    assert before == {n: os.path.getmtime(os.path.join(cfg.output_dir, n)) for n in before}
    other = make_config(cfg.output_dir, cfg.source.annotations, cfg.source.image_dir,
                        cfg.teachers[0].checkpoint, num_augs=N_AUG + 1, per_shard=4)
    with pytest.raises(SchemaError, match="different configuration.*spec"):
        job.run(other)


def test_corrupt_images_are_skipped_and_reported(tmp_path, teacher_ckpt):
    ann, img_dir, images = coco_subset(tmp_path / "src", 6, missing=(4,), corrupt={
        1: lambda b: b[:len(b) // 3],            # truncated JPEG
        2: lambda b: b"",                        # empty file
        3: lambda b: b"GIF89a not really"})      # not an image
    cfg = make_config(tmp_path / "out", ann, img_dir, teacher_ckpt, num_augs=2, per_shard=3,
                      **{"output.arrayrecord_dir": str(tmp_path / "tfds"), "run.max_bad_fraction": 0.9})
    summary = job.run(cfg)
    report = json.load(open(os.path.join(cfg.output_dir, "reinforce_report.json")))
    keys = [os.path.splitext(im["file_name"])[0] for im in images]
    assert summary["report"]["num_samples"] == report["num_samples"] == 2  # images 0 and 5
    assert {(r["key"], r["kind"]) for r in report["skipped"]} == {
        (keys[1], "image_decode"), (keys[2], "image_empty"), (keys[3], "image_decode")}
    assert all(r["reason"] and r["shard"] for r in report["skipped"])
    assert [s["key"] for s in report["skipped_at_indexing"]] == [keys[4]]  # file missing
    assert report["skipped_at_indexing"][0]["kind"] == "missing_image"
    assert sorted(open_source(cfg.output_dir).keys) == sorted([keys[0], keys[5]])
    per_shard = json.load(open(shard_report_path(cfg.output_dir, 0)))
    assert per_shard["num_records"] == 1 and len(per_shard["skipped"]) == 2
    # the ArrayRecord copy (output.arrayrecord_dir) holds the same records
    wds, ar = open_source(cfg.output_dir), open_source(str(tmp_path / "tfds"))
    assert len(ar) == 2 and ar.metadata.teachers == wds.metadata.teachers
    by_key = {r.key: r for r in (wds.decode(wds[i]) for i in range(2))}
    for i in range(2):
        got = ar.decode(ar[i])
        ref = by_key[got.key]
        assert got.image == ref.image and got.param_aug == ref.param_aug and got.captions == ref.captions
        assert np.array_equal(got.image_emb, ref.image_emb) and np.array_equal(got.text_emb, ref.text_emb)


def test_bad_configs_fail_before_any_work(tmp_path, teacher_ckpt):
    ann, img_dir, _ = coco_subset(tmp_path / "src", 2)
    cfg = make_config(tmp_path / "out", ann, img_dir, "")
    with pytest.raises(ValueError, match=r"config.teachers\[0\].*no checkpoint given"):
        job.run(cfg)
    cfg = make_config(tmp_path / "out", ann, img_dir, str(tmp_path / "nope"))
    with pytest.raises(Exception, match="nope"):
        job.run(cfg)
    cfg = make_config(tmp_path / "out", ann, img_dir, teacher_ckpt, **{"synthetic.0.kind": "json",
                                                                       "synthetic.0.json_path": "x.json"})
    with pytest.raises(FileNotFoundError, match=r"config.synthetic\[0\].*x.json"):
        job.run(cfg)
    cfg = make_config(tmp_path / "out", ann, img_dir, teacher_ckpt, **{"source.kind": "lmdb"})
    with pytest.raises(ValueError, match="source.kind must be one of"):
        job.run(cfg)
    assert not os.path.exists(tmp_path / "out" / "reinforced_metadata.json")


def test_imagefolder_and_tar_sources_with_a_captioner_slot(tmp_path, teacher_ckpt):
    """ImageFolder (clothing photos, template captions) with two synthetic keys — the other
    templates and a captioning model plugged into the ``python`` slot — then the same images as
    an image+caption webdataset tar source."""
    import shutil
    import tarfile
    from reinforce_fixture import COCO
    clothing = COCO.parent / "clothing" / "train"
    root = tmp_path / "folder"
    for cls in ("hat", "longsleeve"):
        (root / cls).mkdir(parents=True)
        for f in sorted(os.listdir(clothing / cls))[:2]:
            shutil.copyfile(clothing / cls / f, root / cls / f)
    cfg = make_config(tmp_path / "out_folder", "", "", teacher_ckpt, num_augs=1, per_shard=4, **{
        "source.kind": "imagefolder", "source.root": str(root)})
    cfg.source.class_names = {"longsleeve": "long-sleeve shirt"}
    captioner = cfg.synthetic[0].copy_and_resolve_references()
    captioner.update(kind="python", key="syn_text_captioner", factory="reinforce_fixture:make_captioner",
                     options={"style": "picture"})
    cfg.synthetic.append(captioner)
    job.run(cfg)
    src = open_source(cfg.output_dir)
    recs = [src.decode(src[i]) for i in range(len(src))]
    assert len(recs) == 4
    for r in recs:
        text = r.extra["class_text"]
        assert text in ("hat", "long-sleeve shirt")
        assert r.captions == [f"a photo of a {text}."]
        assert r.syn_texts["syn_text"] == [t.format(text) for t in (
            "a close-up photo of a {}.", "a cropped photo of a {}.", "a photo of the {}.", "a good photo of a {}.")]
        w, h = decode_image(r.image).size
        assert r.syn_texts["syn_text_captioner"] == [f"a picture of {w} by {h} pixels", f"{text} item"]
        assert r.syn_text_embs["syn_text_captioner"].shape == (2, 512)
    # the same photos + their GT captions as a plain image+caption tar (img2dataset layout)
    tar_path = tmp_path / "pairs.tar"
    with tarfile.open(tar_path, "w") as tar:
        for r in recs:
            for ext, data in (("jpg", r.image), ("txt", r.captions[0].encode())):
                info = tarfile.TarInfo(f"{r.key.replace('/', '_')}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    cfg = make_config(tmp_path / "out_tar", "", "", teacher_ckpt, num_augs=1, per_shard=4, **{
        "source.kind": "tar", "source.pattern": str(tar_path), "synthetic.0.kind": "none"})
    job.run(cfg)
    src2 = open_source(cfg.output_dir)
    got = {src2.decode(src2[i]).key: src2.decode(src2[i]) for i in range(len(src2))}
    for r in recs:
        g = got[r.key.replace("/", "_")]
        assert g.captions == r.captions and g.syn_texts == {} and g.image == r.image
        assert g.image_emb.shape == (1, 512)


@pytest.mark.parametrize("name", ["coco_mini", "coco_mini:smoke", "clothing", "datacompdr_like", "add_teacher"])
def test_every_reinforce_config_builds(name):
    """Each shipped config parses into a valid generation spec and caption providers."""
    import importlib
    module, _, arg = name.partition(":")
    cfg = importlib.import_module(f"configs.reinforce.{module}").get_config(*([arg] if arg else []))
    spec = job.build_spec(cfg)
    assert spec.augmentation.num_ops == 2 and spec.augmentation.magnitude == 9
    assert spec.augmentation.crop_size == 224 and spec.augmentation.interpolation == "bicubic"
    assert cfg.teachers and all(t.kind in job.TEACHER_KINDS for t in cfg.teachers)
    if module == "datacompdr_like":
        assert spec.num_augs == 30 and spec.embedding_format == "pth.gz"
        assert spec.text_emb_layout == "datacompdr" and not spec.store_images
        assert [t.label for t in cfg.teachers] == ["ViT-L-14:datacomp_xl_s13b_b90k", "ViT-L-14:openai"]
    elif cfg.synthetic[0].kind != "json":
        assert job.build_captions(cfg.synthetic)[0].key == "syn_text"
    if module in ("coco_mini", "clothing") and not arg:
        source, desc = job.build_source(cfg.source)  # the shared data the config points at
        assert len(source) == {"coco_mini": 80, "clothing": 3068}[module]


def test_output_dirs_that_would_lose_data_are_refused(tmp_path, teacher_ckpt):
    """A directory holding someone else's shards is never written into; an add-a-teacher output
    that is the input (even through a symlink) is refused; a run whose every image is unusable
    fails instead of writing a "complete" empty dataset; a plan left by a run that failed
    before finishing any shard does not lock the directory."""
    ann, img_dir, _ = coco_subset(tmp_path / "src", 3)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "00000000.tar").write_bytes(b"someone else's shard")
    cfg = make_config(foreign, ann, img_dir, teacher_ckpt, num_augs=1)
    with pytest.raises(SchemaError, match="not a run of this generator"):
        job.run(cfg)
    assert (foreign / "00000000.tar").read_bytes() == b"someone else's shard"

    empty = make_config(tmp_path / "nothing", ann, img_dir, teacher_ckpt, num_augs=1,
                        **{"synthetic.0.max_per_image": 1})
    empty.synthetic[0].kind = "json"
    (tmp_path / "caps.json").write_text(json.dumps({"unrelated": ["a caption"]}))
    empty.synthetic[0].json_path = str(tmp_path / "caps.json")
    with pytest.raises(SchemaError, match="3 of 3 images could not be used"):
        job.run(empty)
    assert not os.path.exists(tmp_path / "nothing" / "reinforced_metadata.json")
    # the failed run finished no shard with a record … its plan does not block a fixed rerun
    fixed = make_config(tmp_path / "nothing", ann, img_dir, teacher_ckpt, num_augs=1)
    assert job.run(fixed)["report"]["num_samples"] == 3

    os.symlink(tmp_path / "nothing", tmp_path / "alias")
    add = make_config(tmp_path / "alias", ann, img_dir, teacher_ckpt)
    add.mode, add.input_dir = "add_teacher", str(tmp_path / "nothing")
    add.teachers[0].label = "another"
    with pytest.raises(ValueError, match="output_dir must differ"):
        job.run(add)


def test_cli_errors_are_one_line_with_exit_2(tmp_path):
    import subprocess
    import sys
    from reinforce_fixture import REPO
    base = [sys.executable, "launch/reinforce.py", "--config", "configs/reinforce/coco_mini.py:smoke",
            f"--config.output_dir={tmp_path / 'o'}"]
    cases = {"--config.no_such_key=1": "bad --config override",
             "--config.output.samples_per_shard=abc": "samples_per_shard=abc",
             "--config.run.max_bad_fraction=0": "config.run.max_bad_fraction must be in (0, 1]",
             "--config.source.max_items=-5": "config.source.max_items must be ≥ 0"}
    for flag, needle in cases.items():
        proc = subprocess.run(base + [flag], cwd=REPO, capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, JAX_PLATFORMS="cpu"))
        assert proc.returncode == 2, (flag, proc.stderr[-2000:])
        assert needle in proc.stderr and "Traceback" not in proc.stderr, (flag, proc.stderr[-2000:])
