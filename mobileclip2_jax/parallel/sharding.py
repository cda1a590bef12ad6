"""Parameter sharding by rule, and the check that nothing large is left replicated.

``mode="replicate"``: every parameter on every device (small variants: S0/S2/B fit easily).
``mode="fsdp"``: every parameter with at least ``min_size`` elements is split over the ``fsdp``
axis along its **largest dimension divisible by the axis size** (ties: the last such dim, which
for Flax kernels ``(…, in, out)`` is the output features); smaller ones (norms, biases, the logit
scale) stay replicated — sharding them costs more in collectives than it saves. Optimizer state
follows the parameters (optax states mirror the param tree).

:func:`check_sufficiently_sharded` fails when, with ``fsdp > 1``, a parameter of at least
``min_size`` elements is fully replicated — e.g. a new layer whose dims the rule cannot split, or
a config that set ``mode="replicate"`` for L-14 by mistake — naming the parameter and its bytes.
"""
from __future__ import annotations

from typing import Any, List, Tuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MODES = ("replicate", "fsdp")
DEFAULT_MIN_SIZE = 2 ** 16  # 64 Ki elements (256 KiB fp32)


def _path(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def param_spec(shape: Tuple[int, ...], fsdp_size: int, mode: str = "fsdp",
               min_size: int = DEFAULT_MIN_SIZE) -> P:
    if mode not in MODES:
        raise ValueError(f"sharding mode must be one of {MODES}; got {mode!r}")
    if mode == "replicate" or fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    dims = [i for i, d in enumerate(shape) if d % fsdp_size == 0]
    if not dims:
        return P()
    best = max(dims, key=lambda i: (shape[i], i))
    return P(*[("fsdp" if i == best else None) for i in range(len(shape))])


def param_shardings(params: Any, mesh: Mesh, mode: str = "fsdp", min_size: int = DEFAULT_MIN_SIZE) -> Any:
    """A tree of :class:`NamedSharding` matching ``params`` (arrays or ``ShapeDtypeStruct``)."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(tuple(np.shape(x)), fsdp, mode, min_size)), params)


def replicated_large_params(params: Any, shardings: Any, min_size: int = DEFAULT_MIN_SIZE) -> List[Tuple[str, int]]:
    """``(path, bytes)`` of every parameter with ≥ ``min_size`` elements that is fully replicated."""
    out = []
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    for (path, x), s in zip(flat, jax.tree_util.tree_leaves(shardings)):
        size = int(np.prod(np.shape(x), dtype=np.int64))
        if size >= min_size and all(a is None for a in s.spec):
            out.append((_path(path), size * np.dtype(x.dtype).itemsize))
    return out


def check_sufficiently_sharded(params: Any, shardings: Any, mesh: Mesh, min_size: int = DEFAULT_MIN_SIZE) -> None:
    """Raises when ``fsdp > 1`` and a large parameter is left replicated (see the module doc)."""
    if mesh.shape["fsdp"] == 1:
        return
    bad = replicated_large_params(params, shardings, min_size)
    if bad:
        total = sum(b for _, b in bad)
        listing = ", ".join(f"{p} ({b / 2 ** 20:.1f} MiB)" for p, b in bad[:8])
        raise ValueError(f"{len(bad)} parameters of ≥ {min_size} elements are replicated on every device "
                         f"although the mesh has fsdp={mesh.shape['fsdp']} ({total / 2 ** 20:.1f} MiB in all): "
                         f"{listing}{' …' if len(bad) > 8 else ''}. Use mode='fsdp', or give these shapes a "
                         f"dimension divisible by the fsdp axis")
