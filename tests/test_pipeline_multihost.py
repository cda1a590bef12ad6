"""Two real JAX processes (``jax.distributed`` + gloo on CPU), 2 devices each, one global batch.

Each process builds the same pipeline with its own ``jax.process_index()``, turns its host batch
into a global ``jax.Array`` sharded over the 4-device mesh (``global_batch.GlobalBatchIterator``)
and gathers the global batch back with ``process_allgather``. Checked here: every process sees
the same global batch; rows ``[p·b, (p+1)·b)`` of it are exactly process ``p``'s host batch; the
two hosts read disjoint halves of the records, and together all of them, in each epoch.
"""
import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from mobileclip2_jax.data import webdataset
from reinforced_fixture import build_coco_records

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_WORKER = textwrap.dedent("""
    import json, os, sys
    pid, port, data_dir, out_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

    def main():
        import jax
        import numpy as np
        from jax.experimental import multihost_utils
        from jax.sharding import Mesh
        from mobileclip2_jax.data.global_batch import GlobalBatchIterator, batch_sharding
        from mobileclip2_jax.data.pipeline import PipelineConfig, ReinforcedPipeline, open_source
        from mobileclip2_jax.data.preprocess import PreprocessConfig
        from mobileclip2_jax.data.sampling import SamplingConfig
        from mobileclip2_jax.tokenizers.clip_bpe import ClipBpeTokenizer
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                                   process_id=pid)
        assert jax.process_count() == 2 and jax.device_count() == 4
        mesh = Mesh(np.asarray(jax.devices()).reshape(2, 2), ("data", "fsdp"))
        config = PipelineConfig(global_batch_size=8, preprocess=PreprocessConfig(32),
                                sampling=SamplingConfig(seed=1), process_index=jax.process_index(),
                                process_count=jax.process_count(), read_threads=1)
        host_it = ReinforcedPipeline(open_source(data_dir), config, ClipBpeTokenizer()).host_iterator()
        it = GlobalBatchIterator(host_it, batch_sharding(mesh))
        out = {"host_index": [], "host_image_emb": [], "global_image_emb": [], "global_text": [],
               "host_text": [], "shape": None}
        for _ in range(3):  # 24 rows: two epochs of 12 records
            batch = it.__next__()
            out["shape"] = list(batch["image"].shape)
            assert batch["image"].sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
            host = it.last_host_batch
            out["host_index"].append(host["index"].tolist())
            out["host_epoch"] = out.get("host_epoch", []) + [host["epoch"].tolist()]
            gathered = multihost_utils.process_allgather(batch["image_emb"], tiled=True)
            out["global_image_emb"].append(np.asarray(gathered).tolist())
            out["global_text"].append(np.asarray(
                multihost_utils.process_allgather(batch["text"], tiled=True)).tolist())
            local = [s.data for s in sorted(batch["image_emb"].addressable_shards,
                                            key=lambda s: s.index[0].start)]
            out["host_image_emb"].append(np.concatenate([np.asarray(x) for x in local]).tolist())
        host_it.close() if hasattr(host_it, "close") else None
        with open(os.path.join(out_dir, f"process_{pid}.json"), "w") as f:
            json.dump(out, f)
        jax.distributed.shutdown()

    if __name__ == "__main__":
        main()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_make_one_global_batch(tmp_path):
    records, metadata = build_coco_records(n_images=12, n_aug=2, layout="datacompdr", n_syn=2)
    data = tmp_path / "data"
    webdataset.write_dataset(records, str(data), metadata, records_per_shard=6)
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    procs = [subprocess.Popen([sys.executable, str(script), str(p), str(port), str(data),
                               str(tmp_path)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for p in range(2)]
    outs = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("multi-process pipeline run timed out")
        outs.append(err)
    for p, err in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
    res = [json.loads((tmp_path / f"process_{p}.json").read_text()) for p in range(2)]
    assert res[0]["shape"] == [8, 32, 32, 3]
    for step in range(3):
        g0, g1 = (np.asarray(r["global_image_emb"][step]) for r in res)
        np.testing.assert_array_equal(g0, g1)                      # one global batch
        np.testing.assert_array_equal(np.asarray(res[0]["global_text"][step]),
                                      np.asarray(res[1]["global_text"][step]))
        for p in range(2):                                          # rows [4p, 4p+4) = host p
            np.testing.assert_array_equal(g0[4 * p:4 * p + 4], np.asarray(res[p]["host_image_emb"][step]))
    # epoch 0 = first 12 rows over both hosts: disjoint halves, all records
    per_host = [[i for step in r["host_index"] for i in step] for r in res]
    epochs = [[e for step in r["host_epoch"] for e in step] for r in res]
    first = [[i for i, e in zip(ix, ep) if e == 0] for ix, ep in zip(per_host, epochs)]
    assert not set(first[0]) & set(first[1])
    assert sorted(first[0] + first[1]) == list(range(12))
