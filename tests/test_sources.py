"""(image, captions) sources for building reinforced datasets (``data/sources.py``) and the
COCO-based reinforced-record fixture (``tests/reinforced_fixture.py``), on the real shared data."""
import hashlib
import io
import json
import os
import pathlib
import pickle
import shutil
import tarfile

import numpy as np
import pytest
from PIL import Image

from mobileclip2_jax.data import augment as A
from mobileclip2_jax.data import sources as src
from mobileclip2_jax.data.aug_sampling import AugSamplingConfig
from mobileclip2_jax.data.records import DatasetMetadata, decode_image
from reinforced_fixture import COCO_IMAGES, COCO_JSON, build_coco_records

DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
CLOTHING = DATA / "clothing" / "test"
needs_data = pytest.mark.skipif(not (CLOTHING.exists() and COCO_JSON.exists()),
                                reason="shared data not found")
pytestmark = needs_data
GRAY = "000000113488"  # the grayscale COCO photo (stored as a 3-channel JPEG with r = g = b)


def _coco_json():
    return json.loads(COCO_JSON.read_text())


def _add(tf, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


# ---------------------------------------------------------------------------- ImageFolder
def test_image_folder_on_clothing():
    s = src.ImageFolderSource(CLOTHING, class_names=src.CLOTHING_CLASS_NAMES)
    classes = sorted(os.listdir(CLOTHING))
    assert s.classes == classes and len(classes) == 10
    assert len(s) == sum(len(os.listdir(CLOTHING / c)) for c in classes) == 372
    keys = s.keys()
    assert len(set(keys)) == len(keys) and all("." not in k for k in keys)
    assert keys == src.ImageFolderSource(CLOTHING, class_names=src.CLOTHING_CLASS_NAMES).keys()
    labels = {}
    for item in s:
        cls, stem = item.key.split("/")
        assert item.extra["class_name"] == cls and item.extra["label"] == classes.index(cls)
        assert pathlib.Path(item.extra["path"]) == CLOTHING / cls / f"{stem}.jpg"
        assert item.image == (CLOTHING / cls / f"{stem}.jpg").read_bytes()  # original bytes
        assert item.image_ext == "jpg"
        assert len(item.captions) == len(src.DEFAULT_TEMPLATES)
        labels[cls] = item.captions
    assert labels["longsleeve"][0] == "a photo of a long-sleeve shirt."
    assert all("outerwear" in c for c in labels["outwear"])
    assert labels["t-shirt"] == [t.format("t-shirt") for t in src.DEFAULT_TEMPLATES]
    assert s[-1].key == keys[-1] and s.skipped == []
    with pytest.raises(IndexError):
        s[len(s)]
    assert s[np.int64(3)].key == keys[3]
    clone = pickle.loads(pickle.dumps(s))
    assert clone.keys() == keys and clone[5].image == s[5].image


def test_image_folder_custom_names_templates_and_keys(tmp_path):
    root = tmp_path / "folder"
    (root / "red_fox").mkdir(parents=True)
    (root / "owl" / "sub").mkdir(parents=True)
    (root / "empty").mkdir()
    png = io.BytesIO()
    Image.new("RGB", (8, 6), (1, 2, 3)).save(png, "PNG")
    for name in ("a.jpg", "a.png", "a_1.JPG", "b.v2.webp", ".hidden.jpg", "notes.txt"):
        (root / "red_fox" / name).write_bytes(png.getvalue())
    (root / "owl" / "sub" / "c.jpeg").write_bytes(png.getvalue())
    s = src.ImageFolderSource(root, templates=("{} in the wild",), class_names={"owl": "barn owl"})
    assert s.classes == ["empty", "owl", "red_fox"]
    keys = s.keys()
    assert keys == ["owl/sub/c", "red_fox/a", "red_fox/a_1", "red_fox/a_1_1", "red_fox/b_v2"]
    items = {it.key: it for it in s}
    assert items["owl/sub/c"].captions == ["barn owl in the wild"]
    assert items["red_fox/a"].captions == ["red fox in the wild"]  # default: "_" → " "
    assert items["red_fox/a_1"].image_ext == "png" and items["red_fox/a_1_1"].image_ext == "jpg"
    assert items["owl/sub/c"].extra["label"] == 1
    assert [k.kind for k in s.skipped] == ["empty_class"]


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        src.ImageFolderSource(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no class folders"):
        src.ImageFolderSource(tmp_path)
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "x.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"no images found.*jpg"):
        src.ImageFolderSource(tmp_path)
    with pytest.raises(ValueError, match="exactly one"):
        src.ImageFolderSource(CLOTHING, templates=("a photo",))
    with pytest.raises(ValueError, match="not a directory"):
        src.ImageFolderSource(tmp_path / "cls" / "x.txt")


# ---------------------------------------------------------------------------- COCO
def test_coco_source_on_coco_mini():
    s = src.CocoCaptionsSource(COCO_JSON, COCO_IMAGES)
    data = _coco_json()
    assert len(s) == 80 and s.skipped == []
    assert sum(len(it.captions) for it in s) == 400
    assert s.keys() == [os.path.splitext(im["file_name"])[0] for im in data["images"]]
    by_id = {}
    for a in data["annotations"]:
        by_id.setdefault(a["image_id"], []).append(a["caption"].strip())
    for im, item in zip(data["images"], s):
        assert item.captions == by_id[im["id"]] and len(item.captions) == 5  # annotation order
        assert item.image == (COCO_IMAGES / im["file_name"]).read_bytes()
        assert item.image_ext == "jpg"
        assert {k: item.extra[k] for k in ("image_id", "file_name", "license")} == \
            {"image_id": im["id"], "file_name": im["file_name"], "license": im["license"]}
        assert (item.extra["width"], item.extra["height"]) == \
            Image.open(io.BytesIO(item.image)).size
    gray = s[s.keys().index(GRAY)]
    rgb = np.asarray(decode_image(gray.image, key=gray.key))
    assert rgb.shape[2] == 3 and (rgb[..., 0] == rgb[..., 1]).all() and \
        (rgb[..., 1] == rgb[..., 2]).all()
    clone = pickle.loads(pickle.dumps(s))
    assert clone.keys() == s.keys() and clone[7].captions == s[7].captions


def test_coco_source_skips_and_reports(tmp_path):
    data = _coco_json()
    images = data["images"][:3]
    ids = {im["id"] for im in images}
    anns = [a for a in data["annotations"] if a["image_id"] in ids]
    images = images + [dict(images[0], id=-1, file_name="000000000001.jpg"),  # no caption
                       dict(images[0], id=-2, file_name="000000000002.jpg")]  # no file
    anns = anns + [{"image_id": -2, "id": 1, "caption": "a ghost"},
                   {"image_id": 999999999, "id": 2, "caption": "an orphan"},
                   {"image_id": images[1]["id"], "id": 3, "caption": "   "}]  # empty: dropped
    ann = tmp_path / "captions.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns}))
    for im in images[:3]:
        shutil.copy(COCO_IMAGES / im["file_name"], tmp_path / im["file_name"])
    (tmp_path / "000000000001.jpg").write_bytes((COCO_IMAGES / images[0]["file_name"]).read_bytes())
    s = src.CocoCaptionsSource(ann, tmp_path)
    assert len(s) == 3 and all(len(it.captions) == 5 for it in s)
    kinds = {(k.key, k.kind) for k in s.skipped}
    assert kinds == {("", "orphan_caption"), ("000000000001", "no_caption"),
                     ("000000000002", "missing_image"), ("", "bad_caption")}
    bad = [k for k in s.skipped if k.kind == "bad_caption"][0]
    assert "1 captions are empty or not strings" in bad.detail and str(len(anns) - 1) in bad.detail
    # a file_name escaping the image directory is refused, not read
    escape = dict(images[0], id=-3, file_name="../outside.jpg")
    (tmp_path.parent / "outside.jpg").write_bytes(b"x")
    ann.write_text(json.dumps({"images": images + [escape],
                               "annotations": anns + [{"image_id": -3, "id": 4, "caption": "up"}]}))
    s2 = src.CocoCaptionsSource(ann, tmp_path)
    assert len(s2) == 3 and ("outside", "bad_path") in {(k.key, k.kind) for k in s2.skipped}
    assert any("000000000002.jpg" in k.detail for k in s.skipped)


def test_coco_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        src.CocoCaptionsSource(tmp_path / "missing.json", COCO_IMAGES)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.json: not valid JSON"):
        src.CocoCaptionsSource(bad, COCO_IMAGES)
    bad.write_text(json.dumps({"annotations": []}))
    with pytest.raises(ValueError, match=r"bad\.json.*'images' and 'annotations'"):
        src.CocoCaptionsSource(bad, COCO_IMAGES)
    bad.write_text(json.dumps({"images": [{"id": 1}], "annotations": []}))
    with pytest.raises(ValueError, match=r"images\[0\] must have 'id' and 'file_name'"):
        src.CocoCaptionsSource(bad, COCO_IMAGES)
    bad.write_text(json.dumps({"images": [], "annotations": [{"caption": "x"}]}))
    with pytest.raises(ValueError, match=r"annotations\[0\] must have 'image_id'"):
        src.CocoCaptionsSource(bad, COCO_IMAGES)
    with pytest.raises(FileNotFoundError, match="no_dir"):
        src.CocoCaptionsSource(COCO_JSON, tmp_path / "no_dir")
    with pytest.raises(ValueError, match="no image with both a caption and a file"):
        src.CocoCaptionsSource(COCO_JSON, tmp_path)


# ---------------------------------------------------------------------------- tars
def _coco_tar(path, items, compress=False):
    with tarfile.open(path, "w:gz" if compress else "w") as tf:
        for item in items:
            for name, data in item:
                _add(tf, name, data)


def test_tar_source_from_coco_images(tmp_path):
    coco = src.CocoCaptionsSource(COCO_JSON, COCO_IMAGES)
    pngbuf = io.BytesIO()
    Image.open(io.BytesIO(coco[3].image)).save(pngbuf, "PNG")
    first = [[(f"{it.key}.jpg", it.image), (f"{it.key}.txt", it.captions[0].encode()),
              (f"{it.key}.json", json.dumps({"uid": it.key, "n": i}).encode()),
              (f"{it.key}.url.txt", b"http://example.invalid")]
             for i, it in enumerate(coco[k] for k in range(3))]
    first.append([("sub/dir/png0.png", pngbuf.getvalue()), ("sub/dir/png0.txt", b"a png\n")])
    first.append([("noimg.txt", b"caption without image")])
    first.append([("nocap.jpg", coco[4].image)])
    first.append([("badjson.jpg", coco[4].image), ("badjson.txt", b"x"),
                  ("badjson.json", b"{oops")])
    first.append([("latin.jpg", coco[4].image), ("latin.txt", "café".encode("latin-1"))])
    second = [[(f"{coco[5].key}.jpg", coco[5].image), (f"{coco[5].key}.txt", b"five")],
              [(f"{coco[0].key}.jpg", coco[0].image), (f"{coco[0].key}.txt", b"dup")]]
    t1, t2 = tmp_path / "00000.tar", tmp_path / "00001.tar.gz"
    _coco_tar(t1, first)
    _coco_tar(t2, second, compress=True)
    s = src.ImageTextTarSource([t1, t2])
    assert s.keys() == [coco[0].key, coco[1].key, coco[2].key, "sub/dir/png0", coco[5].key]
    for i in range(3):
        assert s[i].image == coco[i].image and s[i].captions == [coco[i].captions[0]]
        assert s[i].image_ext == "jpg" and s[i].extra["uid"] == coco[i].key
        assert s[i].extra["n"] == i and s[i].extra["tar"] == str(t1)
    assert s[3].image_ext == "png" and s[3].captions == ["a png"]
    assert s[3].image == pngbuf.getvalue()
    assert s[4].image == coco[5].image and s[4].captions == ["five"]  # from the gzipped shard
    assert {(k.key, k.kind) for k in s.skipped} == {
        ("noimg", "missing_image"), ("nocap", "no_caption"), ("badjson", "bad_json"),
        ("latin", "caption"), (coco[0].key, "duplicate_key")}
    clone = pickle.loads(pickle.dumps(s))
    assert [it.image for it in clone] == [it.image for it in s]
    assert src.ImageTextTarSource(str(t1)).keys() == s.keys()[:4]


def test_tar_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.tar"):
        src.ImageTextTarSource(tmp_path / "missing.tar")
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar file" * 100)
    with pytest.raises(ValueError, match="junk.tar: not a readable tar"):
        src.ImageTextTarSource(junk)
    empty = tmp_path / "empty.tar"
    _coco_tar(empty, [[("a.txt", b"only text")]])
    with pytest.raises(ValueError, match="no image \\+ txt pairs"):
        src.ImageTextTarSource(empty)
    with pytest.raises(ValueError, match="at least one"):
        src.ImageTextTarSource([])


# ---------------------------------------------------------------------------- the fixture
@pytest.mark.parametrize("layout", ["datacompdr", "dfndr"])
def test_build_coco_records(layout):
    records, meta = build_coco_records(n_images=6, n_aug=4, layout=layout, n_syn=3, seed=1)
    assert isinstance(meta, DatasetMetadata) and meta.text_emb_layout == layout
    assert [(t.name, t.dim, t.logit_scale) for t in meta.teachers] == \
        [("test-teacher-a", 8, 70.0), ("test-teacher-b", 8, 60.0)]
    assert meta.augmentation == AugSamplingConfig().to_dict() and meta.num_samples == 6
    assert DatasetMetadata.from_json_dict(json.loads(json.dumps(meta.to_json_dict()))) == meta
    coco = src.CocoCaptionsSource(COCO_JSON, COCO_IMAGES)
    syn_key = "syn_text" if layout == "datacompdr" else "syn_text_coco"
    for r, item in zip(records, coco):
        r.validate(meta)
        assert r.key == item.key and r.image == item.image and r.image_ext == "jpg"
        assert r.extra == {"uid": item.key, "sha256": hashlib.sha256(item.image).hexdigest()}
        assert r.captions == item.captions[:1] and r.syn_texts == {syn_key: item.captions[1:4]}
        assert r.text_emb_layout == layout
        assert r.image_emb.shape == (4, 16) and r.image_emb.dtype == np.float32
        if layout == "datacompdr":
            assert r.text_emb.shape == (4, 16) and r.syn_text_embs == {}
            embs = [r.image_emb, r.text_emb]
        else:
            assert r.text_emb.shape == (1, 16) and set(r.syn_text_embs) == {syn_key}
            assert r.syn_text_embs[syn_key].shape == (3, 16)
            embs = [r.image_emb, r.text_emb, r.syn_text_embs[syn_key]]
        for e in embs:  # each teacher block unit-norm; the concatenation is not renormalized
            for lo, hi in meta.blocks():
                np.testing.assert_allclose(np.linalg.norm(e[:, lo:hi], axis=1), 1.0, rtol=1e-5)
        w, h = Image.open(io.BytesIO(r.image)).size
        for p in r.param_aug:
            d = A.decode_aug_params(p)
            assert d.top + d.height <= h and d.left + d.width <= w and len(d.ops) == 2
    again, _ = build_coco_records(n_images=6, n_aug=4, layout=layout, n_syn=3, seed=1)
    assert [r.param_aug for r in again] == [r.param_aug for r in records]
    assert all(np.array_equal(a.image_emb, b.image_emb) for a, b in zip(again, records))
    other, _ = build_coco_records(n_images=6, n_aug=4, layout=layout, n_syn=3, seed=2)
    assert [r.param_aug for r in other] != [r.param_aug for r in records]


def test_build_coco_records_defaults_and_bad_args():
    records, meta = build_coco_records()
    assert len(records) == 8 and meta.teacher_dims == (8, 8) and meta.embed_dim == 16
    assert all(r.n_aug == 3 and r.text_emb.shape == (3, 16) for r in records)
    three, meta3 = build_coco_records(n_images=2, teacher_dims=(4, 8, 12))
    assert meta3.embed_dim == 24 and three[0].image_emb.shape == (3, 24)
    for kwargs in ({"layout": "laion"}, {"n_images": 81}, {"n_syn": 5}, {"teacher_dims": ()}):
        with pytest.raises(ValueError):
            build_coco_records(**kwargs)
