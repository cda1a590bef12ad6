"""TFDS ArrayRecord builder / converter / reader for reinforced records, on real coco_mini images.

Records come from ``shared/data/coco_mini`` (real JPEG bytes, first human caption as GT, the next
two as synthetic, random per-teacher unit-norm fp32 embeddings, 2 teachers x 8 dims), in both
text-embedding layouts, with the stored augmentations of training_and_data.md §9.2 (a real
DataCompDR entry and one with a skipped RandAugment) patched in.
"""
import dataclasses
import json
import os
import pickle
import subprocess
import sys
import textwrap

import grain
import numpy as np
import pytest

from mobileclip2_jax.data import tfds_builder as tb
from mobileclip2_jax.data.records import BadSample, SchemaError, decode_image
from reinforced_fixture import build_coco_records

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HF_AUG = [[14, 347, 370, 427], [[0, 0.0], [6, 0.26999998092651367]]]  # HF viewer row, §9.2
NULL_RA_AUG = [[32, 291, 357, 309], None]  # RandAugment skipped at generation (p < 1)


def make_records(layout, n=6):
    records, meta = build_coco_records(n_images=6, n_aug=3, teacher_dims=(8, 8), layout=layout,
                                       n_syn=2, seed={"datacompdr": 1, "dfndr": 2}[layout])
    records[0].param_aug[0] = HF_AUG
    records[1].param_aug[2] = NULL_RA_AUG
    records[2].url = None
    records[3].extra["note"] = "ünïcødé ✓"
    if layout == "dfndr":  # two GT captions: text_emb holds one row per GT caption
        r = records[4]
        r.captions = [r.captions[0], "a second ground-truth caption"]
        r.text_emb = np.concatenate([r.text_emb, r.text_emb[:1][:, ::-1]], axis=0)
    for r in records:
        r.validate(meta)
    return records[:n], dataclasses.replace(meta, num_samples=n)


def assert_same_record(got, want):
    assert got.key == want.key
    assert got.captions == list(want.captions)
    assert got.syn_texts == want.syn_texts
    assert got.param_aug == want.param_aug
    assert got.image == want.image and type(got.image) is bytes
    assert got.image_ext == want.image_ext
    assert got.extra == want.extra and got.url == want.url
    for name in ("image_emb", "text_emb"):
        a, b = getattr(got, name), np.asarray(getattr(want, name), np.float32)
        assert a.dtype == np.float32 and a.shape == b.shape
        np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))  # bit-equal
    assert list(got.syn_text_embs) == list(want.syn_text_embs)
    for k, v in want.syn_text_embs.items():
        np.testing.assert_array_equal(got.syn_text_embs[k].view(np.uint32),
                                      np.asarray(v, np.float32).view(np.uint32))


@pytest.fixture(scope="module", params=["datacompdr", "dfndr"])
def built(request, tmp_path_factory):
    records, meta = make_records(request.param)
    data_dir = str(tmp_path_factory.mktemp(f"ar_{request.param}"))
    ds_dir = tb.build_arrayrecord_dataset(records, meta, data_dir, name=f"coco_{request.param}",
                                         num_shards=2)
    return records, meta, data_dir, ds_dir


def test_roundtrip_every_field_and_metadata(built):
    records, meta, data_dir, ds_dir = built
    assert ds_dir == os.path.join(data_dir, os.path.basename(os.path.dirname(ds_dir)), "1.0.0")
    files = sorted(os.listdir(ds_dir))
    assert [f for f in files if ".array_record-" in f] == [
        f"{os.path.basename(os.path.dirname(ds_dir))}-train.array_record-0000{i}-of-00002" for i in (0, 1)]
    assert {"reinforced_metadata.json", "conversion_report.json", "metadata.json",
            "dataset_info.json", "features.json"} <= set(files)
    assert not os.path.exists(os.path.join(data_dir, "downloads"))
    src = tb.ArrayRecordSource(data_dir)  # data dir → its only dataset
    assert len(src) == len(records)
    assert src.metadata == dataclasses.replace(meta, num_samples=len(records))
    assert src.metadata.teacher_dims == (8, 8) and src.metadata.logit_scales == (70.0, 60.0)
    for i, want in enumerate(records):  # input order is kept
        raw = src[i]
        assert raw["__index__"] == i and raw["image"] == want.image
        assert_same_record(src.decode(raw), want)
    assert src[-1]["key"].decode() == records[-1].key
    with pytest.raises(IndexError, match="out of range"):
        src[len(records)]
    with open(os.path.join(ds_dir, "metadata.json")) as f:  # TFDS's own copy agrees
        tfds_meta = json.load(f)
    assert tfds_meta["format"] == tb.FORMAT_NAME
    assert tfds_meta["reinforced"]["num_samples"] == len(records)
    assert tfds_meta["reinforced"]["teachers"][1]["name"] == meta.teachers[1].name
    report = tb.read_conversion_report(ds_dir)
    assert (report["num_input"], report["num_written"], report["num_skipped"]) == (6, 6, 0)


def test_layout_encoding(built):
    records, meta, _, ds_dir = built
    raw = tb.ArrayRecordSource(ds_dir)[0]
    rec = records[0]
    if meta.text_emb_layout == "datacompdr":  # text_emb = [GT, syn0, syn1]; no per-key rows
        assert raw["text_emb"].shape == (3, 16) and raw["syn_text_emb"].shape == (0, 16)
        assert json.loads(raw["syn_text_emb_index_json"]) == []
    else:
        assert raw["text_emb"].shape == (1, 16) and raw["syn_text_emb"].shape == (2, 16)
        assert json.loads(raw["syn_text_emb_index_json"]) == [["syn_text_coco", 2]]
    assert json.loads(raw["param_aug_json"])[0] == HF_AUG
    assert json.loads(raw["syn_texts_json"]) == rec.syn_texts


_NO_TF_SCRIPT = textwrap.dedent("""
    import builtins, importlib, pickle, sys
    tried = []
    _imp, _im = builtins.__import__, importlib.import_module
    def guard(name, *a, **k):
        if name.split(".")[0] == "tensorflow":
            tried.append(name)
        return _imp(name, *a, **k)
    def guard_im(name, *a, **k):
        if name.split(".")[0] == "tensorflow":
            tried.append(name)
        return _im(name, *a, **k)
    builtins.__import__, importlib.import_module = guard, guard_im
    from mobileclip2_jax.data import tfds_builder as tb
    records, meta, pickled_src, out = pickle.load(open(sys.argv[1], "rb"))
    src = pickle.loads(pickled_src)           # made and used in the parent process
    keys = [src.decode(src[i]).key for i in range(len(src))]
    ds = tb.build_arrayrecord_dataset(records, meta, out)   # building needs no TF either
    back = tb.ArrayRecordSource(ds)
    r = back.decode(back[1])
    print("RESULT", keys, r.key, r.image_emb.view("uint32").sum(dtype="uint64"))
    assert not tried, f"tensorflow import attempted: {tried}"
    assert "tensorflow" not in sys.modules
    assert "jax" not in sys.modules and "torch" not in sys.modules  # data workers stay light
""")


def test_no_tensorflow_and_pickled_source_reads_in_another_process(built, tmp_path):
    records, meta, _, ds_dir = built
    src = tb.ArrayRecordSource(ds_dir)
    src.decode(src[0])  # the reader is open here; pickling must drop it
    arg = tmp_path / "arg.pkl"
    arg.write_bytes(pickle.dumps((records[:3], meta, pickle.dumps(src), str(tmp_path / "sub"))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]))
    proc = subprocess.run([sys.executable, "-c", _NO_TF_SCRIPT, str(arg)], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))
    want_sum = int(np.asarray(records[1].image_emb, np.float32).view(np.uint32).sum(dtype=np.uint64))
    assert line == f"RESULT {[r.key for r in records]} {records[1].key} {want_sum}"


def test_grain_map_dataset_yields_records(built):
    records, _, _, ds_dir = built
    src = tb.ArrayRecordSource(ds_dir)
    got = list(grain.MapDataset.source(src).map(src.decode))
    assert len(got) == len(records)
    for g, w in zip(got, records):
        assert_same_record(g, w)
    shuffled = grain.MapDataset.source(src).shuffle(seed=3).map(src.decode)
    assert sorted(r.key for r in shuffled) == sorted(r.key for r in records)


def test_pickle_roundtrip_keeps_state_and_repr(built):
    records, meta, _, ds_dir = built
    src = tb.ArrayRecordSource(ds_dir)
    src[0]
    blob = pickle.dumps(src)
    assert len(blob) < 4096  # no reader, no data: only paths and metadata
    copy = pickle.loads(blob)
    assert repr(copy) == repr(src) == f"ArrayRecordSource({len(records)} records, split='train', from {ds_dir})"
    assert copy.metadata == src.metadata and len(copy) == len(src)
    assert_same_record(copy.decode(copy[2]), records[2])


def test_corrupt_image_is_stored_as_is_and_fails_only_at_image_decode(tmp_path):
    records, meta = make_records("datacompdr", n=2)
    corrupt = records[0].image[:200] + b"\x00garbage" * 10
    records[0].image = corrupt
    src = tb.ArrayRecordSource(tb.build_arrayrecord_dataset(records, meta, str(tmp_path)))
    rec = src.decode(src[0])  # the record itself is fine
    assert rec.image == corrupt
    with pytest.raises(BadSample, match=rf"{rec.key}: \[image_decode\]"):
        decode_image(rec.image, key=rec.key)
    assert decode_image(src.decode(src[1]).image).size[0] > 0


def test_builder_skips_and_reports_invalid_records(tmp_path):
    records, meta = make_records("dfndr", n=4)
    records[1].image_emb = np.ones((3, 12), np.float32)  # wrong width for 2 x 8 teachers
    records[2].text_emb = records[2].text_emb * np.nan
    items = [records[0], records[1], BadSample("truncated", "cut short", key="k_cut", source="x.tar"),
             records[2], records[3]]
    ds = tb.build_arrayrecord_dataset(lambda: iter(items), meta, str(tmp_path))
    src = tb.ArrayRecordSource(ds)
    assert [src.decode(src[i]).key for i in range(len(src))] == [records[0].key, records[3].key]
    assert src.metadata.num_samples == 2
    rep = tb.read_conversion_report(ds)
    assert (rep["num_input"], rep["num_written"], rep["num_skipped"]) == (5, 2, 3)
    assert rep["skipped_by_kind"] == {"emb_dim": 1, "non_finite": 1, "truncated": 1}
    assert [(s["index"], s["key"], s["kind"]) for s in rep["skipped"]] == [
        (1, records[1].key, "emb_dim"), (2, "k_cut", "truncated"), (3, records[2].key, "non_finite")]
    assert "12" in rep["skipped"][0]["reason"] and rep["skipped"][1]["source"] == "x.tar"


def test_all_bad_or_no_records_is_a_clear_error(tmp_path):
    records, meta = make_records("datacompdr", n=2)
    for r in records:
        r.captions = [" "]
    with pytest.raises(SchemaError, match=r"none of the 2 input records.*\[caption\]"):
        tb.build_arrayrecord_dataset(records, meta, str(tmp_path / "a"))
    with pytest.raises(SchemaError, match="yielded nothing"):
        tb.build_arrayrecord_dataset([], meta, str(tmp_path / "b"))
    assert not os.path.exists(tmp_path / "a" / "reinforced" / "1.0.0")


def test_existing_dataset_is_not_silently_reused(tmp_path):
    records, meta = make_records("datacompdr", n=3)
    tb.build_arrayrecord_dataset(records[:2], meta, str(tmp_path))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        tb.build_arrayrecord_dataset(records, meta, str(tmp_path))
    ds = tb.build_arrayrecord_dataset(records, meta, str(tmp_path), overwrite=True)
    assert len(tb.ArrayRecordSource(ds)) == 3


def test_missing_or_empty_data_dir_names_path_and_expectation(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(tb.DatasetNotFoundError, match=rf"{missing}: no such directory.*dataset_info.json"):
        tb.ArrayRecordSource(str(missing))
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}: is empty; expected .*array_record"):
        tb.ArrayRecordSource(str(tmp_path))
    (tmp_path / "stray.txt").write_text("x")
    with pytest.raises(SchemaError, match="holds no prepared dataset"):
        tb.ArrayRecordSource(str(tmp_path))
    records, meta = make_records("datacompdr", n=2)
    ds = tb.build_arrayrecord_dataset(records, meta, str(tmp_path))
    with pytest.raises(SchemaError, match=r"no split 'validation'; splits: \['train'\]"):
        tb.ArrayRecordSource(ds, split="validation")
    os.remove(os.path.join(ds, "reinforced_metadata.json"))  # TFDS metadata.json still has it
    assert tb.ArrayRecordSource(ds).metadata == dataclasses.replace(meta, num_samples=2)


def test_decode_of_unreadable_or_malformed_raw_raises_bad_sample(built):
    records, _, _, ds_dir = built
    src = tb.ArrayRecordSource(ds_dir)
    with pytest.raises(BadSample, match=r"where\[3\]: \[truncated\] unreadable record"):
        src.decode({"__error__": "DataLossError: bad chunk", "__source__": "where[3]"})
    raw = src[1]
    raw["param_aug_json"] = b"[[1, 2"
    with pytest.raises(BadSample, match=rf"{ds_dir}\[train\]\[1\]:{records[1].key}: \[bad_json\]"):
        src.decode(raw)
    raw = src[1]
    del raw["text_emb"]
    with pytest.raises(BadSample, match=r"\[missing_key\].*text_emb"):
        src.decode(raw)


def test_convert_webdataset_shards(tmp_path):
    wds = pytest.importorskip("mobileclip2_jax.data.webdataset")
    records, meta = make_records("dfndr", n=6)
    bad = records[2]
    # Self-consistent, so the shard writer takes it, but 20 wide for 2 x 8 teachers: only the
    # converter's check against the dataset metadata catches it.
    pad = lambda a: np.concatenate([a, a[:, :4]], axis=1)  # noqa: E731
    bad.image_emb, bad.text_emb = pad(bad.image_emb), pad(bad.text_emb)
    bad.syn_text_embs = {k: pad(v) for k, v in bad.syn_text_embs.items()}
    records[4].image = records[4].image[:100] + b"\x00" * 50  # corrupt image: still converts
    shard_dir = tmp_path / "wds"
    wds.write_dataset(records, str(shard_dir), meta, records_per_shard=4)
    ds = tb.convert_webdataset_to_arrayrecord(str(shard_dir / "{00000000..00000001}.tar"),
                                              str(tmp_path / "ar"), name="coco_dfndr")
    assert ds == str(tmp_path / "ar" / "coco_dfndr" / "1.0.0")
    src = tb.ArrayRecordSource(ds)
    keep = [r for r in records if r is not bad]
    assert len(src) == 5
    for i, want in enumerate(keep):
        assert_same_record(src.decode(src[i]), want)
    assert src.metadata == dataclasses.replace(meta, num_samples=5)
    with open(os.path.join(ds, tb.REPORT_FILENAME)) as f:
        rep = json.load(f)
    assert (rep["num_input"], rep["num_written"], rep["num_skipped"]) == (6, 5, 1)
    (skip,) = rep["skipped"]
    assert (skip["index"], skip["key"], skip["kind"]) == (2, bad.key, "emb_dim")
    assert skip["source"].endswith("00000000.tar") and "width 20 ≠ metadata embed_dim 16" in skip["reason"]
    assert rep["input"]["kind"] == "webdataset" and len(rep["input"]["shards"]) == 2



class DecodeKey(grain.transforms.Map):
    """A Grain map op at module level, so the worker process can unpickle it by reference."""

    def __init__(self, src):
        self.src = src

    def map(self, raw):
        rec = self.src.decode(raw)
        return {"key": rec.key, "emb_bits": rec.image_emb.view(np.uint32).copy()}


def test_grain_dataloader_with_worker_processes(built):
    records, _, _, ds_dir = built
    src = tb.ArrayRecordSource(ds_dir)
    loader = grain.DataLoader(
        data_source=src, operations=[DecodeKey(src)], worker_count=1,
        sampler=grain.samplers.IndexSampler(len(src), shuffle=False, num_epochs=1))
    got = list(loader)
    assert [g["key"] for g in got] == [r.key for r in records]
    for g, r in zip(got, records):
        np.testing.assert_array_equal(g["emb_bits"], np.asarray(r.image_emb, np.float32).view(np.uint32))
