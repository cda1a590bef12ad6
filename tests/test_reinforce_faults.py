"""``launch/reinforce.py`` as a user runs it: killed with SIGKILL and rerun; two hosts vs one.

Both compare whole outputs shard by shard (tar bytes, per-shard reports without timings, the
metadata) against an uninterrupted single-process run of the same command. The two-host run is
two real ``jax.distributed`` processes (gloo on CPU) started with the same flags, process i
making shards i mod 2 and process 0 finalizing after a barrier.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from reinforce_fixture import REPO, coco_subset, config_flags_for, make_config, zoo_checkpoint

N_IMAGES, PER_SHARD = 12, 2  # 6 shards


def _cmd(cfg, *extra):
    return [sys.executable, "launch/reinforce.py", "--config", "configs/reinforce/coco_mini.py",
            *config_flags_for(cfg), *extra]


def _env():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return env


def _run(cfg, *extra, timeout=600):
    proc = subprocess.run(_cmd(cfg, *extra), cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _snapshot(out_dir):
    """Everything that defines the dataset: shard bytes, reports minus timings, metadata."""
    snap = {}
    for name in sorted(os.listdir(out_dir)):
        path = os.path.join(out_dir, name)
        if name.endswith(".tar"):
            snap[name] = open(path, "rb").read()
        elif name in ("reinforced_metadata.json", "manifest.jsonl"):
            snap[name] = open(path).read()
    for name in sorted(os.listdir(os.path.join(out_dir, "_reports"))):
        rep = json.load(open(os.path.join(out_dir, "_reports", name)))
        rep.pop("seconds")
        snap["_reports/" + name] = rep
    report = json.load(open(os.path.join(out_dir, "reinforce_report.json")))
    snap["report"] = {k: report[k] for k in ("num_samples", "num_shards", "skipped")}
    return snap


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    ckpt = zoo_checkpoint(root / "s0")
    ann, img_dir, _ = coco_subset(root / "src", N_IMAGES)

    def config(name):
        return make_config(root / name, ann, img_dir, ckpt, num_augs=2, per_shard=PER_SHARD)

    reference = config("reference")
    proc = _run(reference)
    assert "[reinforce] 12/12 images" in proc.stderr and "images/s" in proc.stderr and "ETA" in proc.stderr
    return config, _snapshot(reference.output_dir)


def test_sigkill_then_rerun_equals_uninterrupted(setup):
    config, reference = setup
    cfg = config("killed")
    out = cfg.output_dir
    proc = subprocess.Popen(_cmd(cfg), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not os.path.exists(os.path.join(out, "_reports", "00000001.json")):
            assert proc.poll() is None, "generator exited before it could be killed"
            assert time.monotonic() < deadline, "no shard finished in 300 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    finished = sorted(os.listdir(os.path.join(out, "_reports")))
    assert 2 <= len(finished) < 6, finished  # killed mid-run
    assert not os.path.exists(os.path.join(out, "reinforced_metadata.json"))
    tars = [n for n in os.listdir(out) if n.endswith(".tar")]
    assert all(reference[n] == open(os.path.join(out, n), "rb").read() for n in tars
               if os.path.exists(os.path.join(out, "_reports", n[:-4] + ".json")))
    rerun = _run(cfg)
    assert f"{len(finished)} already finished" in rerun.stderr
    assert not [n for n in os.listdir(out) if ".tmp-" in n]
    got = _snapshot(out)
    assert got.keys() == reference.keys()
    for k in reference:
        assert got[k] == reference[k], f"{k} differs from the uninterrupted run"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_produce_the_same_dataset_as_one(setup):
    config, reference = setup
    cfg = config("two_hosts")
    port = _free_port()
    procs = [subprocess.Popen(_cmd(cfg, "--config.run.distributed=True",
                                   f"--config.run.coordinator_address=127.0.0.1:{port}",
                                   "--config.run.num_processes=2", f"--config.run.process_id={i}"),
                              cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    logs = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        logs.append(err)
    assert [p.returncode for p in procs] == [0, 0], "\n".join(x[-3000:] for x in logs)
    assert "process 0/2: 3 shards to make" in logs[0] and "process 1/2: 3 shards to make" in logs[1]
    got = _snapshot(cfg.output_dir)
    assert got.keys() == reference.keys()
    for k in reference:
        assert got[k] == reference[k], f"{k} differs from the single-process run"
