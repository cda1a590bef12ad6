"""``launch/inspect_data.py`` and :func:`inspection.inspect_dataset` on real coco_mini records.

The CLI runs as a user runs it (a subprocess from the repository root, CPU JAX) on webdataset
shards and on the TFDS ArrayRecord conversion of the same data; reports are checked against what
the test put in the data: counts, teachers and their columns, augmentations and synthetic captions
per sample, member keys, per-teacher embedding norms, the exact number of crop boxes made to
reach outside their image, every bad sample by kind with its key and shard, the exit status
(0 trainable / 1 not / 2 unreadable) and the problem text naming what is wrong.
"""
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mobileclip2_jax.data import webdataset
from mobileclip2_jax.data.inspection import NORM_TOLERANCE, format_report, inspect_dataset
from mobileclip2_jax.data.pipeline import open_source
from mobileclip2_jax.data.records import DatasetMetadata, Teacher
from mobileclip2_jax.data.tfds_builder import convert_webdataset_to_arrayrecord
from reinforced_fixture import build_coco_records, unit_blocks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_GOOD, N_AUG, N_SYN = 10, 3, 2
OUTSIDE = (2, 7)  # records whose view 1 gets a crop box reaching outside the image


def run_cli(*args, as_json=True):
    """(exit status, report or stdout, stderr) of the CLI run from the repository root."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "launch/inspect_data.py", *map(str, args)] + (["--json"] if as_json else [])
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode not in (0, 1, 2):  # a traceback, not a verdict
        raise AssertionError(f"{cmd} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout) if as_json else proc.stdout
    return proc.returncode, out, proc.stderr


def image_size(record):
    with Image.open(io.BytesIO(record.image)) as im:
        return im.size  # (width, height)


def teacher_dicts(metadata):
    out, start = [], 0
    for t in metadata.teachers:
        out.append({"name": t.name, "dim": t.dim, "logit_scale": t.logit_scale,
                    "columns": [start, start + t.dim]})
        start += t.dim
    return out


# ---------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """10 DataCompDR-layout records in 2 shards; two have one view boxed outside the image."""
    records, metadata = build_coco_records(n_images=N_GOOD, n_aug=N_AUG, layout="datacompdr",
                                           n_syn=N_SYN, seed=1)
    for i in OUTSIDE:
        w, h = image_size(records[i])
        records[i].param_aug[1] = [[-20, -20, h + 40, w + 40], records[i].param_aug[1][1]]
    out = tmp_path_factory.mktemp("good")
    webdataset.write_dataset(records, str(out), metadata, records_per_shard=5)
    assert len(os.listdir(out)) == 3  # 2 shards + metadata
    return str(out), records, metadata


@pytest.fixture(scope="module")
def arrayrecord(good, tmp_path_factory):
    path, _, _ = good
    return convert_webdataset_to_arrayrecord(path, str(tmp_path_factory.mktemp("tfds")))


@pytest.fixture(scope="module")
def dfndr(tmp_path_factory):
    records, metadata = build_coco_records(n_images=4, n_aug=2, layout="dfndr", n_syn=3, seed=4)
    out = tmp_path_factory.mktemp("dfndr")
    webdataset.write_dataset(records, str(out), metadata, records_per_shard=4)
    return str(out), records, metadata


def _truncate(r, m):
    m["jpg"] = r.image[:len(r.image) // 2]


def _nan(r, m):
    r.image_emb = r.image_emb.copy()
    r.image_emb[1, 3] = np.nan
    m.update(webdataset.encode_record(r))


def _empty_caption(r, m):
    r.captions = [""]
    m.update(webdataset.encode_record(r))


def _bad_syn_json(r, m):
    m["syn.json"] = b'{"syn_text": ["a dog", '


def _no_paug(r, m):
    del m["paug.json"]


def _width(r, m):  # 12 wide everywhere, metadata says 16: a bad sample, not a dataset fault
    rng = np.random.default_rng(5)
    r.image_emb, r.text_emb = unit_blocks(rng, N_AUG, (6, 6)), unit_blocks(rng, 1 + N_SYN, (6, 6))
    m.update(webdataset.encode_record(r))


# record index → (fault, kind the reader must report)
FAULTS = {1: (_truncate, "image_decode"), 3: (_nan, "non_finite"), 5: (_empty_caption, "caption"),
          7: (_bad_syn_json, "bad_json"), 9: (_no_paug, "missing_key"), 11: (_width, "emb_dim")}


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """12 records in 2 shards: the odd ones each carry one fault, written without validation."""
    records, metadata = build_coco_records(n_images=12, n_aug=N_AUG, layout="datacompdr",
                                           n_syn=N_SYN, seed=2)
    out = tmp_path_factory.mktemp("bad")
    expected = {}  # key → (shard path, kind)
    for s in range(2):
        shard = str(out / f"{s:08d}.tar")
        with webdataset.ShardWriter(shard) as w:
            for i in range(6 * s, 6 * s + 6):
                r = records[i]
                members = webdataset.encode_record(r)
                if i in FAULTS:
                    fault, kind = FAULTS[i]
                    fault(r, members)
                    expected[r.key] = (shard, kind)
                w.write_members(r.key, members)
    metadata.save(str(out))
    return str(out), records, metadata, expected


@pytest.fixture(scope="module")
def wrong_dims(tmp_path_factory):
    """Records of teachers 8 + 8 described by metadata saying 4 + 12 (same total width)."""
    records, _ = build_coco_records(n_images=4, n_aug=N_AUG, teacher_dims=(8, 8), seed=3)
    wrong = DatasetMetadata(teachers=(Teacher("test-teacher-a", 4, 70.0),
                                      Teacher("test-teacher-b", 12, 60.0)))
    out = tmp_path_factory.mktemp("wrong_dims")
    webdataset.write_dataset(records, str(out), wrong, records_per_shard=4)
    return str(out), records, wrong


# ------------------------------------------------------------------------------- good data
def assert_good_report(report, records, metadata):
    n = len(records)
    assert report["samples"] == report["inspected"] == report["good_samples"] == n
    assert report["bad_samples"] == 0 and report["bad_by_kind"] == {} and report["bad_listed"] == []
    assert report["teachers"] == teacher_dicts(metadata)
    assert [t["name"] for t in report["teachers"]] == ["test-teacher-a", "test-teacher-b"]
    assert report["embed_dim"] == 16
    assert report["text_emb_layout"] == {"datacompdr": n}
    assert report["metadata_text_emb_layout"] == "datacompdr"
    assert report["augmentations_per_sample"] == {"min": N_AUG, "mean": float(N_AUG), "max": N_AUG}
    assert report["gt_captions_per_sample"] == {"min": 1, "mean": 1.0, "max": 1}
    assert report["synthetic_captions_per_sample"] == {
        "syn_text": {"min": N_SYN, "mean": float(N_SYN), "max": N_SYN}}
    assert report["samples_with_matching_syn_key"] == n
    for t in metadata.teachers:
        s = report["image_emb_norm_per_teacher"][t.name]
        assert s["min"] == pytest.approx(1, abs=1e-5) and s["max"] == pytest.approx(1, abs=1e-5)
    assert report["image_min_side"]["min"] == min(min(image_size(r)) for r in records)
    assert report["samples_with_crop_outside_image"] == len(OUTSIDE)
    assert report["views_with_crop_outside_image"] == len(OUTSIDE)  # one view each
    assert report["problems"] == [] and report["trainable"] is True


def test_good_webdataset_cli_json(good):
    path, records, metadata = good
    rc, report, stderr = run_cli(path)
    assert rc == 0, stderr
    assert_good_report(report, records, metadata)
    assert report["member_keys"] == {k: N_GOOD for k in
                                     ("jpg", "json", "npz", "paug.json", "syn.json", "txt", "url.txt")}
    assert "2 shards" in report["source"]
    assert f"[inspect] {N_GOOD}/{N_GOOD} samples" in stderr  # progress goes to stderr, not the JSON


def test_good_webdataset_cli_human_max_samples(good):
    path, _, _ = good
    rc, out, stderr = run_cli(path, "--max-samples", 3, as_json=False)
    assert rc == 0, stderr
    lines = out.strip().splitlines()
    assert lines[-1] == "TRAINABLE" and "PROBLEM" not in out
    assert f"samples      {N_GOOD} (3 inspected): 3 good, 0 bad" in lines
    assert "test-teacher-a dim 8 scale 70 cols 0:8; test-teacher-b dim 8 scale 60 cols 8:16" in out
    assert "members      jpg×3, json×3, npz×3, paug.json×3, syn.json×3, txt×3, url.txt×3" in lines


def test_max_samples_library(good):
    path, records, _ = good
    report = inspect_dataset(open_source(path), max_samples=3, progress=None)
    assert report["samples"] == N_GOOD and report["inspected"] == report["good_samples"] == 3
    assert set(report["member_keys"].values()) == {3}
    assert report["samples_with_crop_outside_image"] == sum(i < 3 for i in OUTSIDE)  # record 2
    assert report["image_min_side"]["min"] == min(min(image_size(r)) for r in records[:3])
    assert inspect_dataset(open_source(path), max_samples=100, progress=None)["inspected"] == N_GOOD


def test_arrayrecord_cli_json(good, arrayrecord):
    _, records, metadata = good
    assert os.path.isfile(os.path.join(arrayrecord, "dataset_info.json"))
    rc, report, stderr = run_cli(arrayrecord)
    assert rc == 0, stderr
    assert_good_report(report, records, metadata)
    assert report["source"].startswith("ArrayRecordSource(10 records")
    assert report["member_keys"]["image"] == report["member_keys"]["image_emb"] == N_GOOD


def test_library_and_cli_agree(good):
    path, _, _ = good
    report = inspect_dataset(open_source(path), progress=None)
    human = format_report(report)
    assert human.splitlines()[-1] == "TRAINABLE"
    assert f"crops        {len(OUTSIDE)} samples / {len(OUTSIDE)} views reach outside their image" in human


# ---------------------------------------------------------------------------- layouts, regex
def test_dfndr_layout_library(dfndr):
    path, records, metadata = dfndr
    report = inspect_dataset(open_source(path), progress=None)
    assert report["text_emb_layout"] == {"dfndr": 4} and report["metadata_text_emb_layout"] == "dfndr"
    assert report["synthetic_captions_per_sample"] == {"syn_text_coco": {"min": 3, "mean": 3.0, "max": 3}}
    assert report["samples_with_matching_syn_key"] == 4 and report["trainable"] is True
    assert report["member_keys"]["npz"] == 4 and "syn_text_coco_emb" not in report["member_keys"]
    exact = inspect_dataset(open_source(path), syn_text_key_regex="^syn_text$", progress=None)
    assert exact["samples_with_matching_syn_key"] == 0 and exact["trainable"] is False
    assert "no sample has a synthetic-caption key matching '^syn_text$'" in exact["problems"][0]


def test_dfndr_regex_matching_nothing_cli(dfndr):
    path, _, _ = dfndr
    rc, report, _ = run_cli(path, "--syn-text-key-regex", "^nomatch$")
    assert rc == 1
    assert report["text_emb_layout"] == {"dfndr": 4}
    assert report["good_samples"] == 4 and report["samples_with_matching_syn_key"] == 0
    assert report["syn_text_key_regex"] == "^nomatch$"
    assert len(report["problems"]) == 1
    assert "'^nomatch$'" in report["problems"][0] and "syn_text_coco" in report["problems"][0]
    assert report["trainable"] is False


# --------------------------------------------------------------------------------- bad data
def test_bad_samples_cli_json(bad):
    path, _, _, expected = bad
    rc, report, stderr = run_cli(path)
    assert rc == 1, stderr
    assert report["samples"] == report["inspected"] == 12
    assert report["good_samples"] == 6 and report["bad_samples"] == 6
    assert report["bad_by_kind"] == {"bad_json": 1, "caption": 1, "emb_dim": 1, "image_decode": 1,
                                     "missing_key": 1, "non_finite": 1}
    listed = {b["key"]: (b["source"], b["kind"]) for b in report["bad_listed"]}
    assert listed == expected
    assert sorted(b["index"] for b in report["bad_listed"]) == sorted(FAULTS)
    assert all(b["message"] for b in report["bad_listed"])
    assert report["problems"] == ["6 of 12 samples are bad (allowed: 0.0%)"]
    assert report["trainable"] is False
    # good samples are still summarized, bad ones left out
    assert report["augmentations_per_sample"]["min"] == N_AUG
    assert report["member_keys"]["paug.json"] == 11 and report["member_keys"]["jpg"] == 12


def test_bad_samples_allowed_fraction_cli(bad):
    path, _, _, expected = bad
    rc, out, stderr = run_cli(path, "--max-bad-fraction", 0.9, as_json=False)
    assert rc == 0, stderr
    assert out.strip().splitlines()[-1] == "TRAINABLE"
    for key, (shard, kind) in expected.items():
        assert f"  - {shard}:{key} [{kind}]" in out


def test_bad_samples_library(bad):
    path, _, _, expected = bad
    source = open_source(path)
    assert inspect_dataset(source, max_bad_fraction=0.5, progress=None)["trainable"] is True  # 6/12
    assert inspect_dataset(source, max_bad_fraction=0.49, progress=None)["trainable"] is False
    report = inspect_dataset(source, max_listed=2, progress=None)
    assert len(report["bad_listed"]) == 2 and report["bad_samples"] == 6  # counts stay exact
    # without image decoding the truncated JPEG goes unnoticed; the other faults do not
    no_img = inspect_dataset(source, decode_images=False, progress=None)
    assert no_img["bad_samples"] == 5 and "image_decode" not in no_img["bad_by_kind"]
    assert no_img["image_min_side"] == {"min": None, "mean": None, "max": None}


def test_wrong_teacher_dims_cli(wrong_dims):
    path, records, wrong = wrong_dims
    rc, report, stderr = run_cli(path)
    assert rc == 1, stderr
    assert report["good_samples"] == 4 and report["bad_samples"] == 0  # widths agree (16)
    assert report["teachers"] == teacher_dicts(wrong)
    emb = np.concatenate([r.image_emb for r in records])
    for t, (lo, hi) in zip(wrong.teachers, wrong.blocks()):
        norms = np.linalg.norm(emb[:, lo:hi], axis=1)
        got = report["image_emb_norm_per_teacher"][t.name]
        assert got["min"] == pytest.approx(norms.min(), rel=1e-5)
        assert got["max"] == pytest.approx(norms.max(), rel=1e-5)
    a, b = (report["image_emb_norm_per_teacher"][n] for n in ("test-teacher-a", "test-teacher-b"))
    assert a["max"] < 1 - NORM_TOLERANCE and b["min"] > 1 + NORM_TOLERANCE  # far from 1
    assert len(report["problems"]) == 2
    assert "teacher 'test-teacher-a' (columns (0, 4))" in report["problems"][0]
    assert "teacher 'test-teacher-b' (columns (4, 16))" in report["problems"][1]
    assert all("teacher dims may not match" in p for p in report["problems"])
    assert report["trainable"] is False


# --------------------------------------------------------------------------- unreadable input
def _nonexistent(tmp):
    return str(tmp / "no_such_dir"), ["no_such_dir", "do not exist"]


def _no_shards(tmp):
    (tmp / "notes.txt").write_text("no shards here")
    return str(tmp), ["holds no *.tar shards"]


def _no_metadata(tmp, good_path):
    os.link(os.path.join(good_path, "00000000.tar"), tmp / "00000000.tar")
    return str(tmp), [str(tmp / "reinforced_metadata.json"), "no dataset metadata"]


def _bad_metadata(tmp, good_path):
    os.link(os.path.join(good_path, "00000000.tar"), tmp / "00000000.tar")
    (tmp / "reinforced_metadata.json").write_text('{"teachers": [{"name": "a", "dim": 8}')
    return str(tmp), [str(tmp / "reinforced_metadata.json"), "not valid JSON"]


@pytest.mark.parametrize("case", ["nonexistent", "no_shards", "no_metadata", "bad_metadata"])
def test_unreadable_input_exits_2(case, good, tmp_path):
    make = {"nonexistent": _nonexistent, "no_shards": _no_shards, "no_metadata": _no_metadata,
            "bad_metadata": _bad_metadata}[case]
    path, needles = make(tmp_path) if case in ("nonexistent", "no_shards") else make(tmp_path, good[0])
    rc, report, stderr = run_cli(path)
    assert rc == 2
    assert f"inspect_data: cannot read {path}: " in stderr
    for needle in needles:
        assert needle in stderr and needle in report["error"]
    assert report["path"] == path and report["trainable"] is False
    assert "Traceback" not in stderr


def test_truncated_shard_is_not_trainable_even_when_bad_samples_are_allowed(good, tmp_path):
    """A shard cut short loses its tail silently unless the record count is checked against the
    metadata: the report says how many are missing."""
    import shutil
    path, _, _ = good
    for name in os.listdir(path):
        shutil.copyfile(os.path.join(path, name), tmp_path / name)
    shard = tmp_path / "00000001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[:len(data) // 2])
    rc, report, _ = run_cli(str(tmp_path), "--max-bad-fraction", 0.9)
    assert rc == 1 and report["samples"] < N_GOOD
    assert any(f"the metadata says {N_GOOD} samples but {report['samples']} records were found" in p
               for p in report["problems"])


def test_bad_arguments_exit_2(good):
    path, _, _ = good
    for args in (["--syn-text-key-regex", "("], ["--max-samples", "-1"], ["--max-bad-fraction", "5"]):
        proc = subprocess.run([sys.executable, "launch/inspect_data.py", path, *args], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, (args, proc.stderr)


def test_image_less_shards_need_no_images_flag(tmp_path):
    """DataCompDR-style shards without images: missing images are bad samples by default (the
    pipeline cannot train on them alone), accepted with --no-images."""
    records, metadata = build_coco_records(n_images=3, n_aug=2, layout="datacompdr", n_syn=2, seed=6)
    for r in records:
        r.image = None
    webdataset.write_dataset(records, str(tmp_path), metadata, records_per_shard=3)
    rc, report, _ = run_cli(str(tmp_path))
    assert rc == 1 and report["bad_by_kind"] == {"missing_key": 3}
    rc, report, stderr = run_cli(str(tmp_path), "--no-images")
    assert rc == 0, stderr
    assert report["good_samples"] == 3 and report["trainable"] is True
