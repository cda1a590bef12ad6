"""Reinforced webdataset shards (``data/webdataset.py``) and the record schema (``data/records.py``).

Records are built from real COCO photos and captions (``shared/data/coco_mini``): one human
caption as GT, other captions of the same photo as "synthetic" text, stored augmentations in the
DataCompDR form, random per-teacher unit-norm embeddings (2 teachers x 8 dims). What is checked:
the members are what the reference writer produces; everything written reads back equal (both
readers, both text-embedding layouts, ``paug.json`` as list and as JSON string, npz and bf16
pth.gz); every kind of bad input becomes a BadSample naming its shard and key while the other
records of the shard still decode; the writer is atomic and deterministic; the source is
picklable and accepts directories and brace patterns.
"""
import dataclasses
import gzip
import hashlib
import io
import json
import os
import pathlib
import pickle
import subprocess
import sys
import tarfile
import textwrap
import zipfile

import numpy as np
import pytest
from PIL import Image

from mobileclip2_jax.data import webdataset as wds
from mobileclip2_jax.data.records import (BAD_SAMPLE_KINDS, METADATA_FILENAME, BadSample,
                                          DatasetMetadata, ReinforcedRecord, SchemaError, Teacher,
                                          check_records_against_metadata, decode_image)
from mobileclip2_jax.data.torch_pickle import _zip_records, load_pth_gz, to_bfloat16

REPO = pathlib.Path(__file__).resolve().parents[1]
COCO = REPO.parent / "shared" / "data" / "coco_mini"
needs_coco = pytest.mark.skipif(not COCO.exists(), reason="shared/data/coco_mini not found")
DIMS = (8, 8)
AUGS = [[[14, 347, 370, 427], [[0, 0.0], [6, 0.27]]],
        [[0, 0, 200, 180], None],  # a skipped RandAugment is stored as null
        [[32, 21, 157, 109], [[2, -0.09000000357627869], [4, -30.45317268371582]]]]


def meta(layout="datacompdr", dims=DIMS, fmt="npz"):
    return DatasetMetadata(teachers=tuple(Teacher(f"teacher{i}", d, 100.0 - 30 * i)
                                          for i, d in enumerate(dims)),
                           text_emb_layout=layout, embedding_format=fmt)


def unit_rows(rng, n, dims=DIMS):
    """Rows made of per-teacher L2-normalized blocks, as the generator stores them."""
    blocks = [rng.standard_normal((n, d)).astype(np.float32) for d in dims]
    return np.concatenate([b / np.linalg.norm(b, axis=1, keepdims=True) for b in blocks], axis=1)


_COCO_CACHE = {}


def coco_images():
    if not _COCO_CACHE:
        ann = json.loads((COCO / "annotations" / "captions_train2017.json").read_text())
        caps = {}
        for a in ann["annotations"]:
            caps.setdefault(a["image_id"], []).append(a["caption"].strip())
        _COCO_CACHE["images"] = [(im, caps[im["id"]]) for im in
                                 sorted(ann["images"], key=lambda im: im["file_name"])]
    return _COCO_CACHE["images"]


def coco_records(n=4, layout="datacompdr", n_syn=3, seed=0, dims=DIMS, start=0):
    rng = np.random.default_rng(seed)
    out = []
    for im, caps in coco_images()[start:start + n]:
        data = (COCO / "train2017" / im["file_name"]).read_bytes()
        key = hashlib.md5(im["file_name"].encode()).hexdigest()  # 32 hex chars, like a uid
        syn = caps[1:1 + n_syn]
        syn_key = "syn_text" if layout == "datacompdr" else "syn_text_x"
        gt_emb, syn_emb = unit_rows(rng, 1, dims), unit_rows(rng, len(syn), dims)
        out.append(ReinforcedRecord(
            key=key, captions=[caps[0]], syn_texts={syn_key: syn}, param_aug=AUGS,
            image_emb=unit_rows(rng, len(AUGS), dims),
            text_emb=np.concatenate([gt_emb, syn_emb]) if layout == "datacompdr" else gt_emb,
            syn_text_embs={} if layout == "datacompdr" else {syn_key: syn_emb},
            image=data, image_ext="jpg", url=im["coco_url"],
            extra={"uid": key, "sha256": hashlib.sha256(data).hexdigest()}))
    return out


def assert_record_equal(got, want, *, bf16=False):
    conv = to_bfloat16 if bf16 else (lambda x: np.asarray(x, np.float32))
    assert got.key == want.key
    assert got.captions == list(want.captions)
    assert got.syn_texts == want.syn_texts
    assert got.param_aug == want.param_aug
    assert got.image == want.image and got.image_ext == want.image_ext
    assert got.extra == want.extra and got.url == want.url
    for name in ("image_emb", "text_emb"):
        assert getattr(got, name).dtype == np.float32
        np.testing.assert_array_equal(getattr(got, name), conv(getattr(want, name)))
    assert sorted(got.syn_text_embs) == sorted(want.syn_text_embs)
    for k, v in want.syn_text_embs.items():
        np.testing.assert_array_equal(got.syn_text_embs[k], conv(v))


def write_shard(path, records, members_fn=None, **kw):
    with wds.ShardWriter(str(path), **kw) as w:
        for i, r in enumerate(records):
            m = wds.encode_record(r, embedding_format=kw.get("embedding_format", "npz"),
                                  paug_as_json_string=kw.get("paug_as_json_string", False))
            w.write_members(r.key, members_fn(i, m) if members_fn else m)
    return str(path)


def foreign_pickle_pth_gz(marker):
    """A pth.gz whose data.pkl calls os.system("touch <marker>") when unpickled by pickle.load."""
    cmd = f"touch {marker}".encode()
    payload = b"\x80\x02cos\nsystem\n(X" + len(cmd).to_bytes(4, "little") + cmd + b"tR."
    return gzip.compress(_zip_records([("data.pkl", payload), ("byteorder", b"little")]), mtime=0)


# ----------------------------------------------------------------------------- member format
@pytest.mark.parametrize("name,expected", [
    ("9e3930e6bb2783e8dfb66ff465e56ec4.syn.json", ("9e3930e6bb2783e8dfb66ff465e56ec4", "syn.json")),
    ("a/b.c/0001.PTH.GZ", ("a/b.c/0001", "pth.gz")),
    ("./00/0001.jpg", ("00/0001", "jpg")),
    ("0001", ("0001", "")),
    ("dir/.hidden", ("dir/", "hidden")),
])
def test_split_member_name(name, expected):
    assert wds.split_member_name(name) == expected


@needs_coco
@pytest.mark.parametrize("paug_as_json_string", [False, True])
def test_members_are_the_reference_layout(paug_as_json_string):
    rec = coco_records(1, layout="dfndr")[0]
    m = wds.encode_record(rec, paug_as_json_string=paug_as_json_string)
    assert sorted(m) == ["jpg", "json", "npz", "paug.json", "syn.json", "txt", "url.txt"]
    assert m["jpg"] == rec.image and m["txt"] == rec.captions[0].encode()
    assert json.loads(m["syn.json"]) == {"syn_text_x": rec.syn_texts["syn_text_x"]}
    paug = json.loads(m["paug.json"])["param_aug"]
    if paug_as_json_string:  # the HF parquet copy: a JSON string of the list
        assert isinstance(paug, str)
        paug = json.loads(paug)
    assert paug == AUGS and paug[1][1] is None
    assert json.loads(m["json"]) == {"uid": rec.key, "sha256": hashlib.sha256(rec.image).hexdigest()}
    assert m["url.txt"].decode() == rec.url
    with np.load(io.BytesIO(m["npz"])) as z:
        assert sorted(z.files) == ["image_emb", "syn_text_x_emb", "text_emb"]
        assert z["image_emb"].dtype == np.float32 and z["image_emb"].shape == (3, 16)
        np.testing.assert_array_equal(z["syn_text_x_emb"], rec.syn_text_embs["syn_text_x"])
    # the same .npy payloads as np.savez_compressed, but without its wall-clock zip timestamps
    ref = io.BytesIO()
    np.savez_compressed(ref, image_emb=rec.image_emb, text_emb=rec.text_emb,
                        syn_text_x_emb=rec.syn_text_embs["syn_text_x"])
    ours, theirs = zipfile.ZipFile(io.BytesIO(m["npz"])), zipfile.ZipFile(ref)
    assert sorted(ours.namelist()) == sorted(theirs.namelist())
    assert all(ours.read(n) == theirs.read(n) for n in ours.namelist())
    assert wds.encode_record(dataclasses.replace(rec)) == wds.encode_record(rec)  # deterministic
    two = dataclasses.replace(rec, captions=["first caption", "second caption"],
                              text_emb=np.concatenate([rec.text_emb, -rec.text_emb]))
    m2 = wds.encode_record(two)
    assert m2["txt"] == b"first caption"  # what the reference trainer would read
    assert json.loads(m2["captions.json"]) == ["first caption", "second caption"]
    assert wds.decode_members(rec.key, m2).captions == ["first caption", "second caption"]


@needs_coco
@pytest.mark.parametrize("layout", ["datacompdr", "dfndr"])
@pytest.mark.parametrize("paug_as_json_string", [False, True])
def test_round_trip_real_coco(tmp_path, layout, paug_as_json_string):
    records = coco_records(4, layout=layout, seed=1)
    metadata = meta(layout)
    metadata.save(str(tmp_path))
    path = str(tmp_path / "00000000.tar")
    with wds.ShardWriter(path, paug_as_json_string=paug_as_json_string) as w:
        for r in records:
            w.write(r)
    read = list(wds.read_shard_members(path))
    assert [k for k, _ in read] == [r.key for r in records]
    for (key, members), want in zip(read, records):
        got = wds.decode_members(key, members, source=path, metadata=metadata)
        assert_record_equal(got, want)
        assert got.text_emb_layout == layout
    source = wds.WebDatasetSource(path)
    assert len(source) == 4 and source.keys == [r.key for r in records]
    assert source.shard_paths == [path] and source.metadata == metadata
    for i, want in enumerate(records):
        raw = source[i]
        assert raw["__key__"] == want.key and raw["__source__"] == path
        assert raw["jpg"] == want.image
        assert_record_equal(source.decode(raw), want)
    assert source[-1]["__key__"] == records[-1].key
    with pytest.raises(IndexError):
        source[4]


@needs_coco
@pytest.mark.parametrize("layout", ["datacompdr", "dfndr"])
def test_pth_gz_is_the_bf16_rounding_of_npz(tmp_path, layout):
    records = coco_records(3, layout=layout, seed=2)
    npz = write_shard(tmp_path / "npz.tar", records)
    pth = write_shard(tmp_path / "pth.tar", records, embedding_format="pth.gz")
    members = dict(wds.read_shard_members(pth))
    assert all("pth.gz" in m and "npz" not in m for m in members.values())
    raw = load_pth_gz(members[records[0].key]["pth.gz"], upcast_bf16=False)
    assert raw["image_emb"].dtype.name == "bfloat16"  # stored as bf16, like DataCompDR-bf16
    for want, (k1, m1), (k2, m2) in zip(records, wds.read_shard_members(npz), members.items()):
        a, b = wds.decode_members(k1, m1), wds.decode_members(k2, m2)
        assert_record_equal(a, want)
        assert_record_equal(b, want, bf16=True)
        assert not np.array_equal(a.image_emb, b.image_emb)  # the rounding is real
        np.testing.assert_allclose(b.image_emb, a.image_emb, atol=2e-3)


@needs_coco
def test_npz_preferred_and_embedding_keys_renamed():
    rec = coco_records(1, layout="dfndr")[0]
    m = wds.encode_record(rec)
    other = wds.encode_record(dataclasses.replace(rec, image_emb=rec.image_emb * 0.5),
                              embedding_format="pth.gz")
    got = wds.decode_members(rec.key, {**m, "pth.gz": other["pth.gz"]})
    np.testing.assert_array_equal(got.image_emb, rec.image_emb)  # npz wins, as preprocess_dr
    buf = io.BytesIO()  # an older writer's key names: "*embedding*" → "*emb*"
    np.savez(buf, image_embedding=rec.image_emb, text_embedding=rec.text_emb,
             syn_text_x_embedding=rec.syn_text_embs["syn_text_x"])
    got = wds.decode_members(rec.key, {**m, "npz": buf.getvalue()})
    assert_record_equal(got, rec)


# ----------------------------------------------------------------------------- bad input
def _npz(**arrays):
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@needs_coco
def test_bad_records_are_named_and_the_rest_decode(tmp_path):
    records = coco_records(16, layout="datacompdr", seed=3)
    nan = records[5].image_emb.copy()
    nan[1, 3] = np.nan
    marker = tmp_path / "pwned"
    faults = {  # record index → (member edit, expected kind, text in the message)
        1: (lambda m: m.pop("paug.json"), "missing_key", "paug.json"),
        2: (lambda m: m.pop("npz"), "missing_key", "npz or pth.gz"),
        3: (lambda m: m.update({"syn.json": b'{"syn_text": ["a", '}), "bad_json", "syn.json"),
        4: (lambda m: m.update({"npz": _npz(image_emb=unit_rows(np.random.default_rng(0), 3, (8, 4)),
                                            text_emb=unit_rows(np.random.default_rng(1), 4, (8, 4)))}),
            "emb_dim", "12"),
        5: (lambda m: m.update({"npz": _npz(image_emb=nan, text_emb=records[5].text_emb)}),
            "non_finite", "image_emb"),
        6: (lambda m: m.update({"txt": b"   "}), "caption", "empty"),
        7: (lambda m: m.update({"txt": b"a \xff\xfe caption"}), "caption", "UTF-8"),
        8: (lambda m: (m.pop("npz"), m.update({"pth.gz": foreign_pickle_pth_gz(marker)})),
            "embeddings", "os.system"),
        9: (lambda m: m.update({"npz": b"PK\x03\x04 not really"}), "embeddings", "npz"),
        10: (lambda m: m.update({"paug.json": b'{"param_aug": [[[0, 0, -5, 10], null]]}'}),
             "bad_aug", "param_aug[0]"),
        11: (lambda m: m.pop("jpg"), "missing_key", "image"),
        12: (lambda m: m.update({"paug.json": b'{"param_aug": 7}'}), "bad_json", "param_aug"),
        13: (lambda m: m.update({"npz": _npz(image_emb=records[13].image_emb,
                                             text_emb=records[13].text_emb[:2])}), "emb_shape", "text_emb"),
    }

    def edit(i, m):
        if i in faults:
            faults[i][0](m)
        return m

    path = write_shard(tmp_path / "00000007.tar", records, edit)
    metadata = meta()
    metadata.save(str(tmp_path))
    source = wds.WebDatasetSource(path)
    via_reader = dict(wds.read_shard_members(path))
    for i, want in enumerate(records):
        for decode in (lambda: source.decode(source[i]),
                       lambda: wds.decode_members(want.key, via_reader[want.key], source=path,
                                                  metadata=metadata)):
            if i in faults:
                with pytest.raises(BadSample) as info:
                    decode()
                e = info.value
                assert e.kind == faults[i][1], (i, str(e))
                assert e.key == want.key and e.source == path
                assert want.key in str(e) and "00000007.tar" in str(e) and faults[i][2] in str(e)
                assert pickle.loads(pickle.dumps(e)).kind == e.kind  # crosses worker processes
            else:
                assert_record_equal(decode(), want)
    assert not marker.exists()  # the refused pickle executed nothing
    # image-less shards are fine when the image is not required, but still need a caption
    got = wds.decode_members("k", {k: v for k, v in wds.encode_record(records[0]).items() if k != "jpg"},
                             require_image=False)
    assert got.image is None and got.captions == records[0].captions


@needs_coco
def test_truncated_and_corrupt_shards(tmp_path):
    records = coco_records(5, seed=4)
    metadata = meta()
    metadata.save(str(tmp_path))
    good = write_shard(tmp_path / "good.tar", records)
    data = pathlib.Path(good).read_bytes()
    offsets = {}  # key → data offset of its npz member
    with tarfile.open(good) as tf:
        for info in tf:
            offsets[info.name] = (info.offset, info.offset_data, info.size)
    cut_at = offsets[f"{records[3].key}.npz"][1] + 100  # inside record 3's embeddings
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(data[:cut_at])
    got = []
    with pytest.raises(wds.ShardError, match="truncated.tar") as info:
        for key, members in wds.read_shard_members(str(truncated)):
            got.append(key)
    assert got == [r.key for r in records[:3]] and records[3].key in str(info.value)
    assert isinstance(info.value, SchemaError)
    source = wds.WebDatasetSource(str(truncated))
    assert source.keys == [r.key for r in records[:4]]
    for i in range(3):
        assert_record_equal(source.decode(source[i]), records[i])
    with pytest.raises(BadSample) as bad:
        source.decode(source[3])
    assert bad.value.kind == "truncated" and records[3].key in str(bad.value)
    assert "truncated.tar" in str(bad.value) and len(source.index_faults) == 1
    # a corrupt header in mid-file (tarfile alone would end the archive there, silently)
    corrupt = bytearray(data)
    header = offsets[f"{records[2].key}.jpg"][0]
    corrupt[header + 148:header + 156] = b"9999999\0"  # a wrong checksum
    (tmp_path / "corrupt.tar").write_bytes(bytes(corrupt))
    got = []
    with pytest.raises(wds.ShardError, match=f"corrupt.tar.*byte {header}"):
        for key, members in wds.read_shard_members(str(tmp_path / "corrupt.tar")):
            got.append(key)
    assert got == [records[0].key]  # record 1 may be incomplete: the next header is unreadable
    source = wds.WebDatasetSource(str(tmp_path / "corrupt.tar"))
    assert_record_equal(source.decode(source[0]), records[0])
    with pytest.raises(BadSample, match="truncated"):
        source.decode(source[1])
    (tmp_path / "notatar.tar").write_bytes(b"definitely not a tar file" * 40)
    with pytest.raises(SchemaError, match="notatar.tar"):
        wds.WebDatasetSource(str(tmp_path / "notatar.tar"))


@needs_coco
def test_image_less_shards_join_image_shards_by_key(tmp_path):
    records = coco_records(6, seed=5)
    dr_dir, img_dir = tmp_path / "dr", tmp_path / "images"
    image_side = {"jpg", "txt", "json"}
    dr = write_shard(dr_dir / "00000000.tar", records,
                     lambda i, m: {k: v for k, v in m.items() if k not in ("jpg", "txt")})
    meta().save(str(dr_dir))
    missing = records[4].key

    def image_members(i, m):  # DataComp-12M style: image, caption, its own json
        uid = json.loads(m["json"])["uid"]
        return {**{k: v for k, v in m.items() if k in image_side},
                "json": json.dumps({"uid": uid, "width": 640}).encode()}
    extra = coco_records(1, seed=6, start=10)[0]
    img = write_shard(img_dir / "00000000.tar", [r for r in records if r.key != missing] + [extra],
                      image_members)
    source = wds.WebDatasetSource(str(dr_dir), image_shards=str(img_dir))
    assert len(source) == 6 and source.unmatched_image_keys == 1  # `extra` has no reinforced side
    for i, want in enumerate(records):
        raw = source[i]
        assert raw["__source__"] == dr
        if want.key == missing:
            with pytest.raises(BadSample) as info:
                source.decode(raw)
            assert info.value.kind == "missing_key" and missing in str(info.value) and dr in str(info.value)
            assert "not in the image shards" in str(info.value)
            continue
        assert raw["__image_source__"] == img
        got = source.decode(raw)
        assert_record_equal(got, dataclasses.replace(want, extra={**want.extra, "width": 640}))
    # without the join, the image-less shard is a clear missing_key, not a crash
    alone = wds.WebDatasetSource(dr)
    with pytest.raises(BadSample, match="joined") as info:
        alone.decode(alone[0])
    assert info.value.kind == "missing_key"


# ----------------------------------------------------------------------------- writer
@needs_coco
def test_writer_is_atomic_and_deterministic(tmp_path):
    records = coco_records(3, seed=7)
    a, b = write_shard(tmp_path / "a.tar", records), write_shard(tmp_path / "b.tar", records)
    before = pathlib.Path(a).read_bytes()
    assert before == pathlib.Path(b).read_bytes()
    with tarfile.open(a) as tf:
        infos = tf.getmembers()
    assert all(i.mtime == 0 and i.uid == 0 and i.gid == 0 and i.uname == "" for i in infos)
    names = [i.name for i in infos]
    assert names[:7] == sorted(f"{records[0].key}.{e}" for e in
                               ["jpg", "json", "npz", "paug.json", "syn.json", "txt", "url.txt"])
    with pytest.raises(FileExistsError, match="a.tar"):
        wds.ShardWriter(a)
    with pytest.raises(RuntimeError, match="boom"):
        with wds.ShardWriter(a, overwrite=True) as w:
            w.write(records[1])
            tmp = w.tmp_path
            assert os.path.exists(tmp)
            raise RuntimeError("boom")
    assert not os.path.exists(tmp) and pathlib.Path(a).read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["a.tar", "b.tar"]
    with pytest.raises(ValueError, match="duplicate key"):
        with wds.ShardWriter(str(tmp_path / "c.tar")) as w:
            w.write(records[0])
            w.write(records[0])
    assert sorted(os.listdir(tmp_path)) == ["a.tar", "b.tar"]
    with wds.ShardWriter(a, overwrite=True) as w:
        w.write(records[2])
    assert [k for k, _ in wds.read_shard_members(a)] == [records[2].key]
    with wds.ShardWriter(str(tmp_path / "d.tar")) as w:
        for bad_key, ext in [("x.y", "jpg"), ("", "jpg"), ("k", "JPG"), ("k", "")]:
            with pytest.raises(ValueError, match="read back"):
                w.write_members(bad_key, {ext: b"1"})
        nan = dataclasses.replace(records[0], image_emb=records[0].image_emb * np.nan)
        with pytest.raises(BadSample, match="non_finite"):
            w.write(nan)  # write() validates; validate=False / write_members() write it anyway
        w.write(nan, validate=False)
    written = wds.WebDatasetSource(str(tmp_path / "d.tar"), metadata=meta())
    with pytest.raises(BadSample, match="non_finite"):
        written.decode(written[0])
    short = dataclasses.replace(records[1], text_emb=records[1].text_emb[:2])  # 2 rows, 1 + 3 needed
    with pytest.raises(BadSample, match="emb_shape"):
        wds.write_dataset([records[0], short], str(tmp_path / "ds"), meta())
    assert not os.path.exists(tmp_path / "ds" / "00000000.tar")  # nothing half-written
    wds.write_dataset([records[0], short], str(tmp_path / "ds"), meta(), validate=False)
    assert len(wds.WebDatasetSource(str(tmp_path / "ds"))) == 2


@needs_coco
def test_write_dataset_and_shard_inputs(tmp_path):
    records = coco_records(5, seed=8)
    out = tmp_path / "ds"
    paths = wds.write_dataset(records, str(out), meta(), records_per_shard=2)
    assert [os.path.basename(p) for p in paths] == ["00000000.tar", "00000001.tar", "00000002.tar"]
    saved = DatasetMetadata.load(str(out))
    assert saved.num_samples == 5 and saved.teacher_dims == DIMS
    keys = [r.key for r in records]
    for spec in (str(out), f"{out}/{{00000000..00000002}}.tar", f"{out}/*.tar", paths,
                 [f"{out}/0000000{{0,1}}.tar", paths[2]]):
        source = wds.WebDatasetSource(spec)
        assert source.keys == keys and source.shard_paths == paths, spec
    assert wds.WebDatasetSource(f"{out}/{{00000001..00000002}}.tar").shard_paths == paths[1:]
    assert wds.expand_shards(f"{out}/{{00000002..00000001}}.tar") == paths[:0:-1]  # descending
    source = wds.WebDatasetSource(str(out))
    assert_record_equal(source.decode(source[3]), records[3])
    with pytest.raises(FileNotFoundError, match="00000009.tar"):
        wds.WebDatasetSource(f"{out}/{{00000000..00000009}}.tar")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        wds.WebDatasetSource(str(tmp_path / "empty"))
    with pytest.raises(SchemaError, match=f"{tmp_path / 'empty'}.*no \\*.tar"):
        wds.WebDatasetSource(str(tmp_path / "empty"))
    bare = tmp_path / "bare"
    write_shard(bare / "00000000.tar", records[:1])
    with pytest.raises(SchemaError, match=f"{bare}.*{METADATA_FILENAME}"):
        wds.WebDatasetSource(str(bare))
    assert len(wds.WebDatasetSource(str(bare), metadata=meta())) == 1
    with pytest.raises(FileExistsError):
        wds.write_dataset(records, str(out), meta(), records_per_shard=2)
    bf16 = wds.write_dataset(records[:2], str(tmp_path / "bf16"), meta(), embedding_format="pth.gz")
    assert DatasetMetadata.load(str(tmp_path / "bf16")).embedding_format == "pth.gz"
    assert "pth.gz" in wds.WebDatasetSource(bf16)[1]


class _CountingFile(io.FileIO):
    bytes_read = 0

    def read(self, n=-1):
        data = super().read(n)
        _CountingFile.bytes_read += len(data)
        return data

    def readinto(self, b):
        n = super().readinto(b)
        _CountingFile.bytes_read += n or 0
        return n


@needs_coco
def test_index_reads_headers_only_and_threads_agree(tmp_path, monkeypatch):
    records = coco_records(6, seed=11)
    path = write_shard(tmp_path / "00000000.tar", records)
    n_members = sum(len(wds.encode_record(r)) for r in records)
    monkeypatch.setattr(wds, "open", lambda p, mode="rb", buffering=-1: _CountingFile(p, "r"),
                        raising=False)
    _CountingFile.bytes_read = 0
    source = wds.WebDatasetSource(path, metadata=meta())
    monkeypatch.undo()
    # one 512-byte header (+1 byte end-of-data probe) per member, plus the end-of-archive check
    assert _CountingFile.bytes_read <= 513 * n_members + 1024 + 512
    assert os.path.getsize(path) > 20 * _CountingFile.bytes_read  # the JPEGs and npz are not read
    expected = [source[i] for i in range(len(source))]
    from concurrent.futures import ThreadPoolExecutor
    order = np.random.default_rng(0).permutation(np.tile(np.arange(len(source)), 8)).tolist()
    with ThreadPoolExecutor(8) as pool:  # Grain reads with several threads
        got = list(pool.map(source.__getitem__, order))
    assert all(g == expected[i] for g, i in zip(got, order))


@needs_coco
def test_reads_across_many_shards_with_few_open_files_and_after_fork(tmp_path):
    records = coco_records(8, seed=12)
    wds.write_dataset(records, str(tmp_path), meta(), records_per_shard=1)
    source = wds.WebDatasetSource(str(tmp_path))
    source._reader.max_open = 2  # force evictions while other threads still read
    expected = [source[i] for i in range(8)]
    from concurrent.futures import ThreadPoolExecutor
    order = np.random.default_rng(1).permutation(np.tile(np.arange(8), 16)).tolist()
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(source.__getitem__, order))
    assert all(g == expected[i] for g, i in zip(got, order))
    assert len(source._reader._fds) <= 2
    if not hasattr(os, "fork"):
        return
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: inherited fds are dropped and reopened, results unchanged
        ok = all(source[i] == expected[i] for i in range(8)) and source._reader._pid == os.getpid()
        os.write(w, b"1" if ok else b"0")
        os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"1"
    os.waitpid(pid, 0)
    assert source[3] == expected[3]  # the parent's fds are untouched


_CHILD = textwrap.dedent("""
    import hashlib, pickle, sys
    source = pickle.load(open(sys.argv[1], "rb"))
    for i in range(len(source)):
        raw = source[i]
        rec = source.decode(raw)
        data = b"".join(raw[k] for k in sorted(raw) if not k.startswith("__"))
        print(rec.key, hashlib.sha256(data).hexdigest())
""")


@needs_coco
def test_source_pickles_and_reads_in_another_process(tmp_path):
    records = coco_records(4, seed=9)
    wds.write_dataset(records, str(tmp_path), meta(), records_per_shard=2)
    source = wds.WebDatasetSource(str(tmp_path))
    expected = []
    for i in range(len(source)):  # opens files in this process first
        raw = source[i]
        expected.append(f"{raw['__key__']} " + hashlib.sha256(
            b"".join(raw[k] for k in sorted(raw) if not k.startswith("__"))).hexdigest())
    clone = pickle.loads(pickle.dumps(source))
    assert_record_equal(clone.decode(clone[2]), records[2])
    (tmp_path / "source.pkl").write_bytes(pickle.dumps(source))
    out = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "source.pkl")],
                         capture_output=True, text=True, cwd=REPO, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:-1] == expected


def test_reads_tars_from_other_writers(tmp_path):
    """GNU tar long names, upper-case extensions, ./ prefixes, directories and stray files."""
    rng = np.random.default_rng(10)
    emb = {"image_emb": unit_rows(rng, 1), "text_emb": unit_rows(rng, 2)}
    long_key = "shard_00/" + "k" * 120
    members = {"./" + long_key + ".TXT": b"a red bus", long_key + ".syn.json": b'{"syn_text": ["a bus"]}',
               long_key + ".paug.json": b'{"param_aug": [[[0, 0, 4, 4], null]]}',
               long_key + ".npz": _npz(**emb), long_key + ".PNG": b"\x89PNG not decoded here",
               "README": b"no extension: skipped", "other.json": b'{"x": 1}'}
    path = tmp_path / "gnu.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        d = tarfile.TarInfo("shard_00")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1700000000
            tf.addfile(info, io.BytesIO(data))
    read = list(wds.read_shard_members(str(path)))
    assert [k for k, _ in read] == [long_key, "other"]
    rec = wds.decode_members(read[0][0], read[0][1])
    assert rec.captions == ["a red bus"] and rec.image_ext == "png"
    assert rec.param_aug == [[[0, 0, 4, 4], None]]
    np.testing.assert_array_equal(rec.text_emb, emb["text_emb"])
    source = wds.WebDatasetSource(str(path), metadata=meta())
    assert source.keys == [long_key, "other"] and source[0]["txt"] == b"a red bus"
    with pytest.raises(BadSample, match="missing_key"):
        source.decode(source[1])
    dup = tmp_path / "dup.tar"  # the same member twice for one key
    with tarfile.open(dup, "w") as tf:
        for data in (b"one", b"two"):
            info = tarfile.TarInfo("k.txt")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with pytest.raises(BadSample, match="duplicate_member"):
        source = wds.WebDatasetSource(str(dup), metadata=meta())
        source.decode(source[0])


# ----------------------------------------------------------------------------- records.py
def test_metadata_round_trip_and_errors(tmp_path):
    m = DatasetMetadata(teachers=(Teacher("ViT-L-14:openai", 768, 100.0, "open_clip"),
                                  Teacher("ViT-L-14:datacomp_xl_s13b_b90k", 768, 100.0)),
                        text_emb_layout="dfndr", embedding_format="pth.gz",
                        augmentation={"random_resized_crop": {"size": 224}}, num_samples=12)
    path = m.save(str(tmp_path))
    assert os.path.basename(path) == METADATA_FILENAME
    back = DatasetMetadata.load(str(tmp_path))
    assert back == m and back.embed_dim == 1536 and back.blocks() == [(0, 768), (768, 1536)]
    assert back.logit_scales == (100.0, 100.0)
    with pytest.raises(FileExistsError):
        m.save(str(tmp_path))
    d = m.to_json_dict()
    for change, match in [({"embed_dim": 1000}, "1536"), ({"teachers": []}, "non-empty"),
                          ({"version": 2}, "version"), ({"text_emb_layout": "x"}, "text_emb_layout"),
                          ({"teachers": [{"name": "a", "dim": 0}]}, "positive"),
                          ({"teachers": [{"name": "a", "dim": 4}, {"name": "a", "dim": 4}]}, "unique")]:
        with pytest.raises(SchemaError, match=match):
            DatasetMetadata.from_json_dict({**d, **change})
    (tmp_path / METADATA_FILENAME).write_text("{not json")
    with pytest.raises(SchemaError, match="not valid JSON"):
        DatasetMetadata.load(str(tmp_path))
    with pytest.raises(SchemaError, match=METADATA_FILENAME):
        DatasetMetadata.load(str(tmp_path / "nowhere"))


def test_bad_sample_kinds_and_pickling():
    assert {"embeddings", "truncated", "duplicate_member"} <= set(BAD_SAMPLE_KINDS)
    e = BadSample("caption", "caption 0 is empty", key="k1")
    located = e.located(key="other", source="shard.tar")
    assert str(located) == "shard.tar:k1: [caption] caption 0 is empty"
    back = pickle.loads(pickle.dumps(located))
    assert (back.kind, back.key, back.source, str(back)) == ("caption", "k1", "shard.tar", str(located))
    with pytest.raises(ValueError, match="unknown bad-sample kind"):
        BadSample("nope", "x")


@needs_coco
def test_decode_image_modes_and_faults():
    data = (COCO / "train2017" / coco_images()[0][0]["file_name"]).read_bytes()
    img = decode_image(data)
    assert img.mode == "RGB" and img.size == Image.open(io.BytesIO(data)).size
    rgba = Image.new("RGBA", (5, 4), (200, 100, 50, 0))  # alpha dropped, not composited
    for mode in ("RGBA", "L", "P", "CMYK", "I;16"):
        src = rgba.convert(mode) if mode != "I;16" else Image.fromarray(
            np.arange(20, dtype=np.uint16).reshape(4, 5) * 3000)
        buf = io.BytesIO()
        src.save(buf, "PNG" if mode != "CMYK" else "JPEG")
        got = decode_image(buf.getvalue())
        want = Image.open(io.BytesIO(buf.getvalue())).convert("RGBA").convert("RGB")
        assert got.mode == "RGB" and np.array_equal(np.asarray(got), np.asarray(want)), mode
    assert np.asarray(decode_image(_png(rgba)))[0, 0].tolist() == [200, 100, 50]
    for bad, kind in [(data[:len(data) // 2], "image_decode"), (b"", "image_empty"),
                      (b"GIF89a garbage", "image_decode")]:
        with pytest.raises(BadSample) as info:
            decode_image(bad, key="k", source="s.tar")
        assert info.value.kind == kind and str(info.value).startswith("s.tar:k:")


def _png(img):
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@needs_coco
def test_validate_faults_and_dataset_check():
    rec = coco_records(1, layout="dfndr")[0]
    m = meta("dfndr")
    assert rec.validate(m) is rec and rec.text_emb_layout == "dfndr"
    cases = [
        (dict(syn_text_embs={}), "missing_key", "syn_text_x_emb"),
        (dict(image_emb=rec.image_emb[:2]), "emb_shape", "3 stored"),
        (dict(syn_text_embs={"syn_text_x": rec.syn_text_embs["syn_text_x"][:1]}), "emb_shape", "rows"),
        (dict(text_emb=rec.text_emb[:, :8]), "emb_dim", "text_emb"),
        (dict(param_aug=[]), "bad_aug", "non-empty"),
        (dict(param_aug=[[[0, 0, 10, 10], [[14, 0.0]]]]), "bad_aug", "out of range"),
        (dict(captions=[]), "missing_key", "caption"),
        (dict(syn_texts={"syn_text_x": ["ok", ""]}), "caption", "syn.json"),
        (dict(image=None), "missing_key", "image"),
        (dict(image=b""), "image_empty", "empty"),
        (dict(image_ext="gif"), "missing_key", "gif"),
    ]
    for change, kind, text in cases:
        with pytest.raises(BadSample) as info:
            dataclasses.replace(rec, **change).validate(m, source="s.tar")
        assert info.value.kind == kind and text in str(info.value) and "s.tar" in str(info.value), change
    assert dataclasses.replace(rec, image=None).validate(m, require_image=False).image is None
    wrong = DatasetMetadata(teachers=(Teacher("a", 8), Teacher("b", 16)))
    with pytest.raises(BadSample, match="emb_dim"):
        dataclasses.replace(rec).validate(wrong)
    check_records_against_metadata([rec], m)
    with pytest.raises(SchemaError, match="sum to 24"):
        check_records_against_metadata([rec], wrong)
    with pytest.raises(SchemaError, match="no readable record"):
        check_records_against_metadata([], m)
