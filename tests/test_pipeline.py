"""The Grain pipeline on a reinforced set built from real COCO photos and captions.

What is checked: the batches hold exactly the replayed view / tokens / teacher rows of the
choices :mod:`sampling` makes for each (record, epoch); resuming from a saved iterator state in a
*fresh process* gives the identical next batches (0 and 2 workers); the stream does not depend on
the worker count; hosts read disjoint halves of each epoch; bad samples are skipped, named and
counted without losing a good one; a dataset of the wrong width fails before training starts.
"""
import json
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from mobileclip2_jax.data import webdataset
from mobileclip2_jax.data.augment import Replayer
from mobileclip2_jax.data.pipeline import PipelineConfig, ReinforcedPipeline, open_source
from mobileclip2_jax.data.preprocess import PreprocessConfig
from mobileclip2_jax.data.records import DatasetMetadata, SchemaError, Teacher, decode_image
from mobileclip2_jax.data.sampling import SamplingConfig, sample_record
from mobileclip2_jax.tokenizers.clip_bpe import ClipBpeTokenizer
from reinforced_fixture import build_coco_records

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 64


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    records, metadata = build_coco_records(n_images=12, n_aug=3, layout="datacompdr", n_syn=2)
    out = tmp_path_factory.mktemp("reinforced")
    webdataset.write_dataset(records, str(out), metadata, records_per_shard=5)
    return str(out), records, metadata


@pytest.fixture(scope="module")
def tokenizer():
    return ClipBpeTokenizer()


def make_config(**kw):
    base = dict(global_batch_size=4, preprocess=PreprocessConfig(SIZE), sampling=SamplingConfig(seed=3),
                read_threads=2, read_buffer_size=8)
    base.update(kw)
    return PipelineConfig(**base)


def read(pipeline, n):
    it = pipeline.host_iterator()
    try:
        return [next(it) for _ in range(n)], it.get_state(), ReinforcedPipeline.stats(it).summary()
    finally:
        if hasattr(it, "close"):
            it.close()


def test_batches_hold_the_sampled_choices(dataset_dir, tokenizer):
    path, records, _ = dataset_dir
    source = open_source(path)
    pipeline = ReinforcedPipeline(source, make_config(), tokenizer)
    batches, _, stats = read(pipeline, 6)  # 24 examples: two full epochs of 12
    by_key = {r.key: r for r in records}
    keys = source.keys
    replayer = Replayer(PreprocessConfig(SIZE))
    seen_per_epoch = {}
    for b in batches:
        assert b["image"].shape == (4, SIZE, SIZE, 3) and b["image"].dtype == np.float32
        assert b["text"].shape == (4, 77) and b["syn_text"].dtype == np.int32
        for row in range(4):
            index, epoch = int(b["index"][row]), int(b["epoch"][row])
            seen_per_epoch.setdefault(epoch, []).append(index)
            rec = by_key[keys[index]]
            s = sample_record(rec, index, epoch, SamplingConfig(seed=3))
            pixels, _ = replayer(decode_image(rec.image), s.aug_params)
            np.testing.assert_array_equal(b["image"][row], pixels)
            np.testing.assert_array_equal(b["text"][row], tokenizer([s.caption])[0])
            np.testing.assert_array_equal(b["syn_text"][row], tokenizer([s.syn_caption])[0])
            np.testing.assert_array_equal(b["image_emb"][row], s.image_emb)
            np.testing.assert_array_equal(b["text_emb"][row], s.text_emb)
            np.testing.assert_array_equal(b["syn_text_emb"][row], s.syn_text_emb)
            assert int(b["aug_index"][row]) == s.choice.aug_index
    # each epoch visits every record once, in a different order
    assert sorted(seen_per_epoch[0]) == sorted(seen_per_epoch[1]) == list(range(12))
    assert seen_per_epoch[0] != seen_per_epoch[1]
    assert stats["examples"] == 24 and stats["bad_samples"] == 0


_RESUME_SCRIPT = textwrap.dedent("""
    import json, pickle, sys
    import numpy as np
    from absl import flags
    flags.FLAGS.mark_as_parsed()
    from mobileclip2_jax.data.pipeline import ReinforcedPipeline, open_source
    if __name__ == "__main__":
        path, config_file, state_file, out_file = sys.argv[1:5]
        with open(config_file, "rb") as f:
            config, tokenizer = pickle.load(f)
        pipeline = ReinforcedPipeline(open_source(path), config, tokenizer)
        it = pipeline.host_iterator()
        with open(state_file) as f:
            it.set_state(json.load(f))
        batches = [next(it) for _ in range(3)]
        it.close() if hasattr(it, "close") else None
        np.savez(out_file, **{f"{i}/{k}": v for i, b in enumerate(batches) for k, v in b.items()})
""")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_in_a_fresh_process(dataset_dir, tokenizer, tmp_path, num_workers):
    path, _, _ = dataset_dir
    config = make_config(num_workers=num_workers)
    pipeline = ReinforcedPipeline(open_source(path), config, tokenizer)
    it = pipeline.host_iterator()
    try:
        for _ in range(4):
            next(it)
        state = it.get_state()
        expected = [next(it) for _ in range(3)]
    finally:
        if hasattr(it, "close"):
            it.close()
    json.dumps(state)  # what Orbax's Grain handler stores
    (tmp_path / "state.json").write_text(json.dumps(state))
    with open(tmp_path / "config.pkl", "wb") as f:
        pickle.dump((config, tokenizer), f)
    script = tmp_path / "resume.py"
    script.write_text(_RESUME_SCRIPT)
    out = tmp_path / "out.npz"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(script), path, str(tmp_path / "config.pkl"),
                           str(tmp_path / "state.json"), str(out)], capture_output=True, text=True,
                          timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(out)
    for i, batch in enumerate(expected):
        for k, v in batch.items():
            np.testing.assert_array_equal(got[f"{i}/{k}"], v, err_msg=f"batch {i} field {k}")


def test_stream_does_not_depend_on_worker_count(dataset_dir, tokenizer):
    path, _, _ = dataset_dir
    source = open_source(path)
    ref, _, _ = read(ReinforcedPipeline(source, make_config(num_workers=0), tokenizer), 4)
    got, _, _ = read(ReinforcedPipeline(source, make_config(num_workers=2), tokenizer), 4)
    for a, b in zip(ref, got):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_hosts_read_disjoint_halves(dataset_dir, tokenizer):
    path, _, _ = dataset_dir
    source = open_source(path)
    per_host = []
    for p in range(2):
        cfg = make_config(global_batch_size=4, process_index=p, process_count=2)
        batches, _, _ = read(ReinforcedPipeline(source, cfg, tokenizer), 3)  # 2 rows × 3 = one epoch half
        assert all(b["image"].shape[0] == 2 for b in batches)
        per_host.append([int(i) for b in batches for i in b["index"]])
        assert all(int(e) == 0 for b in batches for e in b["epoch"])
    assert not set(per_host[0]) & set(per_host[1])
    assert sorted(per_host[0] + per_host[1]) == list(range(12))


def test_uint8_images_and_mix_synthetic(dataset_dir, tokenizer):
    path, _, _ = dataset_dir
    source = open_source(path)
    f32, _, _ = read(ReinforcedPipeline(source, make_config(), tokenizer), 1)
    u8, _, _ = read(ReinforcedPipeline(source, make_config(image_dtype="uint8"), tokenizer), 1)
    assert u8[0]["image"].dtype == np.uint8
    np.testing.assert_array_equal(u8[0]["image"].astype(np.float32) / np.float32(255), f32[0]["image"])
    mix, _, _ = read(ReinforcedPipeline(source, make_config(
        sampling=SamplingConfig(seed=3, mix_synthetic_ratio=1.0)), tokenizer), 1)
    assert "syn_text" not in mix[0] and "syn_text_emb" not in mix[0]
    np.testing.assert_array_equal(mix[0]["text_emb"], f32[0]["syn_text_emb"])


def test_bad_samples_are_skipped_named_and_counted(tmp_path, tokenizer, caplog):
    records, metadata = build_coco_records(n_images=8, n_aug=3, layout="datacompdr", n_syn=2)
    records[1].image = records[1].image[:200]            # truncated JPEG
    records[4].image_emb = records[4].image_emb.copy()
    records[4].image_emb[0, 0] = np.nan                  # NaN in an embedding
    good_keys = {r.key for i, r in enumerate(records) if i not in (1, 4)}
    shards = []
    with webdataset.ShardWriter(str(tmp_path / "00000000.tar")) as w:
        for i, r in enumerate(records):
            if i == 4:  # bypass validation on write: the writer may refuse NaN, a reader must cope
                w.write_members(r.key, webdataset.encode_record(r))
            else:
                w.write(r)
    metadata.save(str(tmp_path))
    shards.append(str(tmp_path / "00000000.tar"))
    source = open_source(str(tmp_path))
    pipeline = ReinforcedPipeline(source, make_config(global_batch_size=2, shuffle=False, num_epochs=1,
                                                      drop_remainder=False), tokenizer)
    with caplog.at_level("WARNING"):
        batches, _, stats = read_all(pipeline)
    seen = {source.keys[int(i)] for b in batches for i in b["index"]}
    assert seen == good_keys                           # no good sample lost
    assert stats["bad_samples"] == 2
    assert stats["bad_by_kind"] == {"image_decode": 1, "non_finite": 1}
    text = caplog.text
    assert records[1].key in text and records[4].key in text and "00000000.tar" in text


def read_all(pipeline):
    it = pipeline.host_iterator()
    out = []
    try:
        for b in it:
            out.append(b)
        return out, it.get_state(), ReinforcedPipeline.stats(it).summary()
    finally:
        if hasattr(it, "close"):
            it.close()


def test_too_many_bad_samples_abort(tmp_path, tokenizer):
    records, metadata = build_coco_records(n_images=6, n_aug=2, layout="datacompdr", n_syn=2)
    with webdataset.ShardWriter(str(tmp_path / "00000000.tar")) as w:
        for r in records:
            r.image = b"not a jpeg"
            w.write_members(r.key, webdataset.encode_record(r))
    metadata.save(str(tmp_path))
    with pytest.raises(SchemaError, match="none of the first|image"):
        # the up-front probe decodes records but not images, so this one reaches the loop
        pipeline = ReinforcedPipeline(open_source(str(tmp_path)), make_config(
            global_batch_size=2, min_samples_for_bad_check=4), tokenizer)
        read(pipeline, 2)


def test_schema_mismatch_fails_before_training(dataset_dir, tmp_path, tokenizer):
    path, records, metadata = dataset_dir
    wrong = DatasetMetadata(teachers=(Teacher("a", 8), Teacher("b", 16)))
    webdataset.write_dataset(records[:4], str(tmp_path), wrong, records_per_shard=4)
    with pytest.raises(SchemaError, match="sum to 24|embed_dim|width"):
        ReinforcedPipeline(open_source(str(tmp_path)), make_config(), tokenizer)


def test_config_validation():
    with pytest.raises(ValueError, match="not divisible"):
        make_config(global_batch_size=5, process_count=2)
    with pytest.raises(ValueError, match="image_dtype"):
        make_config(image_dtype="float16")
