"""Every kind of bad input at once, through the whole Grain pipeline (0 and 2 workers).

One dataset mixes good records whose images come in unusual but valid encodings (CMYK JPEG,
16-bit, palette, RGBA and grayscale PNG) with records carrying one fault each. The pipeline
must deliver every good record exactly once per epoch — unusual modes decoded the reference way
(through RGBA, alpha dropped) — skip every bad one, count it under the right kind, and log a
warning that names the record key and its shard; the stream must not depend on the worker count.
"""
import io

import numpy as np
import pytest
from PIL import Image

from mobileclip2_jax.data import webdataset
from mobileclip2_jax.data.augment import Replayer
from mobileclip2_jax.data.pipeline import PipelineConfig, ReinforcedPipeline, open_source
from mobileclip2_jax.data.preprocess import PreprocessConfig
from mobileclip2_jax.data.sampling import SamplingConfig, sample_record
from mobileclip2_jax.tokenizers.clip_bpe import ClipBpeTokenizer
from reinforced_fixture import build_coco_records, unit_blocks

SIZE, N_AUG, N_SYN = 48, 2, 2


def _encode(img, fmt):
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def _rgb(r):
    return Image.open(io.BytesIO(r.image)).convert("RGB")


def _cmyk(r):
    r.image, r.image_ext = _encode(_rgb(r).convert("CMYK"), "JPEG"), "jpg"


def _i16(r):
    gray = np.asarray(_rgb(r).convert("L"), np.uint16) * 3  # values up to 765: PIL clips to 255
    r.image, r.image_ext = _encode(Image.fromarray(gray), "PNG"), "png"


def _palette(r):
    r.image, r.image_ext = _encode(_rgb(r).convert("P"), "PNG"), "png"


def _rgba(r):
    img = _rgb(r).convert("RGBA")
    img.putalpha(Image.new("L", img.size, 17))  # nearly transparent: alpha is dropped, not composited
    r.image, r.image_ext = _encode(img, "PNG"), "png"


def _gray(r):
    r.image, r.image_ext = _encode(_rgb(r).convert("L"), "PNG"), "png"


GOOD_MODES = {0: (_cmyk, "CMYK"), 1: (_i16, "I;16"), 2: (_palette, "P"), 3: (_rgba, "RGBA"),
              4: (_gray, "L")}


# Faults applied to the encoded members (bypassing the writer's validation, as a foreign writer
# or a bad disk would): record index → (edit(record, members), expected kind).
def _truncated(r, m):
    m["jpg"] = r.image[:len(r.image) // 3]


def _corrupt(r, m):
    m["jpg"] = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4


def _empty_image(r, m):
    m["jpg"] = b""


def _no_paug(r, m):
    del m["paug.json"]


def _bad_syn_json(r, m):
    m["syn.json"] = b'{"syn_text": ["a cat on a mat", '


def _dim_mismatch(r, m):
    rng = np.random.default_rng(9)
    r.image_emb, r.text_emb = unit_blocks(rng, N_AUG, (6, 6)), unit_blocks(rng, 1 + N_SYN, (6, 6))
    m.update(webdataset.encode_record(r))


def _nan(r, m):
    r.image_emb = r.image_emb.copy()
    r.image_emb[0, 5] = np.nan
    m.update(webdataset.encode_record(r))


def _empty_caption(r, m):
    m["txt"] = b"   "


def _non_utf8_caption(r, m):
    m["txt"] = b"a caf\xe9 in paris"  # Latin-1, not UTF-8


FAULTS = {6: _truncated, 7: _corrupt, 8: _empty_image, 9: _no_paug, 10: _bad_syn_json,
          11: _dim_mismatch, 12: _nan, 13: _empty_caption, 14: _non_utf8_caption}
EXPECTED_KINDS = {"bad_json": 1, "caption": 2, "emb_dim": 1, "image_decode": 2, "image_empty": 1,
                  "missing_key": 1, "non_finite": 1}
N_RECORDS = 16  # 0–4 unusual modes, 5 and 15 plain, 6–14 faulty


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    records, metadata = build_coco_records(n_images=N_RECORDS, n_aug=N_AUG, layout="datacompdr",
                                           n_syn=N_SYN, seed=7)
    for i, (convert, _) in GOOD_MODES.items():
        convert(records[i])
    out = tmp_path_factory.mktemp("bad_input")
    shard_of = {}
    for s in range(2):
        shard = str(out / f"{s:08d}.tar")
        with webdataset.ShardWriter(shard) as w:
            for i in range(8 * s, 8 * s + 8):
                r = records[i]
                if i in FAULTS:
                    members = webdataset.encode_record(r)
                    FAULTS[i](r, members)
                    w.write_members(r.key, members)
                else:
                    w.write(r)  # good records go through the validating writer
                shard_of[r.key] = shard
    metadata.save(str(out))
    return str(out), records, shard_of


def _read_epoch(path, num_workers):
    config = PipelineConfig(global_batch_size=2, preprocess=PreprocessConfig(SIZE),
                            sampling=SamplingConfig(seed=5), num_epochs=1, drop_remainder=False,
                            num_workers=num_workers, read_threads=2, read_buffer_size=4,
                            max_bad_fraction=0.9, min_samples_for_bad_check=4)
    it = ReinforcedPipeline(open_source(path), config, ClipBpeTokenizer()).host_iterator()
    try:
        batches = list(it)
        return batches, ReinforcedPipeline.stats(it).summary()
    finally:
        if hasattr(it, "close"):
            it.close()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_kind_of_bad_input_end_to_end(dataset, num_workers, caplog):
    path, records, shard_of = dataset
    with caplog.at_level("WARNING"):
        batches, stats = _read_epoch(path, num_workers)
    keys = open_source(path).keys
    rows = [(b, row) for b in batches for row in range(len(b["index"]))]
    seen = [keys[int(b["index"][row])] for b, row in rows]
    good_keys = {r.key for i, r in enumerate(records) if i not in FAULTS}
    assert sorted(seen) == sorted(good_keys)  # every good record exactly once, no bad one
    assert stats["bad_samples"] == len(FAULTS)
    assert stats["bad_by_kind"] == EXPECTED_KINDS
    for i in FAULTS:  # each warning names the key and the shard it came from
        key = records[i].key
        lines = [m for m in caplog.messages if key in m]
        assert lines, f"no warning names {key}"
        assert any(shard_of[key] in m or shard_of[key].rsplit("/", 1)[1] in m for m in lines)

    # unusual image modes: the batch holds the reference decode (via RGBA) of the stored bytes
    replayer = Replayer(PreprocessConfig(SIZE))
    by_key = {r.key: (i, r) for i, r in enumerate(records)}
    for b, row in rows:
        i, rec = by_key[keys[int(b["index"][row])]]
        if i not in GOOD_MODES:
            continue
        with Image.open(io.BytesIO(rec.image)) as im:
            assert im.mode == GOOD_MODES[i][1]
            reference = im.convert("RGBA").convert("RGB")
        s = sample_record(rec, int(b["index"][row]), int(b["epoch"][row]), SamplingConfig(seed=5))
        pixels, _ = replayer(reference, s.aug_params)
        np.testing.assert_array_equal(b["image"][row], pixels, err_msg=GOOD_MODES[i][1])
        if GOOD_MODES[i][1] in ("L", "I;16"):  # grayscale stays grayscale
            img = b["image"][row]
            np.testing.assert_array_equal(img[..., 0], img[..., 1])
            np.testing.assert_array_equal(img[..., 0], img[..., 2])


def test_bad_input_stream_does_not_depend_on_workers(dataset):
    path, _, _ = dataset
    ref, ref_stats = _read_epoch(path, 0)
    got, got_stats = _read_epoch(path, 2)
    assert ref_stats["bad_by_kind"] == got_stats["bad_by_kind"] == EXPECTED_KINDS
    assert len(ref) == len(got)
    for a, b in zip(ref, got):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
