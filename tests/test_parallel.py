"""Mesh and FSDP sharding rules on 8 CPU devices (subprocess: the device count is fixed at import).

On MobileCLIP2-S4's real parameter tree (shapes only): with a 4×2 ``data × fsdp`` mesh every
parameter of ≥ 64 Ki elements is split over ``fsdp`` along its largest divisible dimension,
small ones are replicated, per-device bytes drop accordingly, a device_put tree has the expected
local shard shapes, and the "sufficiently sharded" check fails — naming the parameters — when a
config replicates everything on an fsdp mesh. Mesh-shape errors are checked in-process.
"""
import os
import subprocess
import sys
import textwrap

import jax
import pytest

from mobileclip2_jax.parallel.mesh import make_mesh
from mobileclip2_jax.parallel.sharding import param_spec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = textwrap.dedent("""
    import os, json
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, numpy as np
    from mobileclip2_jax.factory import random_variables
    from mobileclip2_jax.models.clip import CLIP
    from mobileclip2_jax.models.zoo import get_model_spec, image_tower_config, text_tower_config
    from mobileclip2_jax.parallel.mesh import make_mesh, batch_sharding
    from mobileclip2_jax.parallel.sharding import (param_shardings, check_sufficiently_sharded,
                                                    replicated_large_params, DEFAULT_MIN_SIZE)
    spec = get_model_spec("MobileCLIP2-S4")
    module = CLIP(image_tower_config(spec), text_tower_config(spec))
    params = jax.eval_shape(lambda: random_variables(module))["params"]
    mesh = make_mesh(data=-1, fsdp=2)
    sh = param_shardings(params, mesh, "fsdp")
    out = {"mesh": dict(mesh.shape), "bad": [], "total": 0, "per_device": 0}
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    for (path, x), s in zip(flat, jax.tree_util.tree_leaves(sh)):
        n = int(np.prod(x.shape)); out["total"] += n
        sharded = [i for i, a in enumerate(s.spec) if a == "fsdp"]
        if n >= DEFAULT_MIN_SIZE:
            divisible = [i for i, d in enumerate(x.shape) if d % 2 == 0]
            ok = (len(sharded) == 1 and x.shape[sharded[0]] == max(x.shape[i] for i in divisible)) if divisible else not sharded
        else:
            ok = not sharded
        if not ok:
            out["bad"].append([str(path), list(x.shape), str(s.spec)])
        out["per_device"] += n // (2 if sharded else 1)
    check_sufficiently_sharded(params, sh, mesh)
    try:
        check_sufficiently_sharded(params, param_shardings(params, mesh, "replicate"), mesh)
        out["replicate_error"] = None
    except ValueError as e:
        out["replicate_error"] = str(e)
    out["n_replicated_large"] = len(replicated_large_params(params, param_shardings(params, mesh, "replicate")))
    x = jax.device_put(np.arange(8 * 256 * 512, dtype=np.float32).reshape(8, 256, 512)[0],
                       param_shardings({"k": jax.ShapeDtypeStruct((256, 512), np.float32)}, mesh)["k"])
    out["local_shape"] = list(x.addressable_shards[0].data.shape)
    b = jax.device_put(np.zeros((16, 3), np.float32), batch_sharding(mesh))
    out["batch_local"] = list(b.addressable_shards[0].data.shape)
    print("RESULT " + json.dumps(out))
""")


def test_fsdp_rules_on_a_large_variant():
    import json
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads([l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][0][7:])
    assert out["mesh"] == {"data": 4, "fsdp": 2}
    assert out["bad"] == []
    assert out["per_device"] < 0.52 * out["total"]  # nearly everything is in large, split params
    assert out["n_replicated_large"] > 100
    assert out["replicate_error"] and "replicated on every device although the mesh has fsdp=2" in out["replicate_error"]
    assert "MiB" in out["replicate_error"] and ("text/" in out["replicate_error"] or "visual/" in out["replicate_error"])
    assert out["local_shape"] == [256, 256]       # (256, 512) split on its larger dim
    assert out["batch_local"] == [2, 3]           # 16 rows over 8 devices


def test_mesh_shape_errors_and_spec_rule():
    devices = jax.devices()
    assert make_mesh(devices=devices).shape == {"data": len(devices), "fsdp": 1}
    with pytest.raises(ValueError, match="does not divide"):
        make_mesh(data=-1, fsdp=len(devices) + 1)
    with pytest.raises(ValueError, match="does not match"):
        make_mesh(data=2, fsdp=3, devices=devices * 5)
    assert param_spec((768, 3072), 2) == jax.sharding.PartitionSpec(None, "fsdp")
    assert param_spec((3, 3, 64, 128), 4) == jax.sharding.PartitionSpec(None, None, None, "fsdp")
    assert param_spec((768,), 2) == jax.sharding.PartitionSpec()          # small: replicated
    assert param_spec((49408, 768), 2) == jax.sharding.PartitionSpec("fsdp", None)
    assert param_spec((768, 3072), 2, "replicate") == jax.sharding.PartitionSpec()
    with pytest.raises(ValueError, match="mode"):
        param_spec((8, 8), 2, "zero3")
