"""Host batches → one global ``jax.Array`` per field, sharded on the batch axis over the mesh.

Every process runs the same program (SPMD) and produces its own ``per_host_batch`` rows; the
train step is written on the *global* batch. ``jax.make_array_from_process_local_data`` stitches
the host rows into one array whose leading axis is split over the mesh's batch axes (by default
``("data", "fsdp")``: the batch is sharded over every device, as big_vision and maxtext do), without
any cross-host copy. Process ``p`` contributes global rows ``[p·b, (p+1)·b)``.

This is the only data module that imports JAX, and only the main process imports it; worker
processes never do.
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, Mapping, Optional, Sequence, Tuple, Union

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Fields that stay on the host (provenance for logging / debugging, not model inputs).
HOST_ONLY_FIELDS = ("index", "epoch", "aug_index", "crop_padded")

BatchAxes = Union[str, Tuple[str, ...]]


def batch_sharding(mesh: Mesh, batch_axes: BatchAxes = ("data", "fsdp")) -> NamedSharding:
    """``NamedSharding`` splitting the leading (batch) axis over ``batch_axes`` of ``mesh``.

    Axes not in the mesh are dropped, so a ``("data",)``-only mesh works with the default.
    """
    axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
    present = tuple(a for a in axes if a in mesh.axis_names)
    if not present:
        raise ValueError(f"none of the batch axes {axes} is an axis of the mesh {mesh.axis_names}")
    return NamedSharding(mesh, PartitionSpec(present))


def to_global(host_batch: Mapping[str, np.ndarray], sharding: NamedSharding, *,
              skip: Sequence[str] = HOST_ONLY_FIELDS) -> Dict[str, jax.Array]:
    """One host batch (dict of numpy arrays, leading axis = per-host batch) → global arrays.

    The per-host batch must divide evenly over this process's addressable devices of the
    sharding (e.g. 8 local devices need a multiple of 8 rows); the error says so otherwise.
    """
    n_local = len({d for d in sharding.addressable_devices})
    out = {}
    for name, value in host_batch.items():
        if name in skip:
            continue
        value = np.asarray(value)
        if value.ndim == 0 or value.shape[0] % n_local:
            raise ValueError(f"field {name!r}: host batch of shape {value.shape} cannot be split "
                             f"over this process's {n_local} devices (the per-host batch must be "
                             f"a multiple of the local device count)")
        out[name] = jax.make_array_from_process_local_data(sharding, value)
    return out


class GlobalBatchIterator:
    """Wraps a host-batch iterator (a Grain ``DatasetIterator``) to yield global ``jax.Array`` s.

    ``host_iterator`` stays the object to checkpoint (Grain/Orbax); ``get_state``/``set_state``
    delegate to it. ``last_host_batch`` keeps the host-only provenance fields of the last batch.
    """

    def __init__(self, host_iterator: Any, sharding: NamedSharding,
                 skip: Sequence[str] = HOST_ONLY_FIELDS):
        self.host_iterator, self.sharding, self.skip = host_iterator, sharding, tuple(skip)
        self.last_host_batch: Optional[Dict[str, np.ndarray]] = None

    def __iter__(self) -> Iterator[Dict[str, jax.Array]]:
        return self

    def __next__(self) -> Dict[str, jax.Array]:
        batch = next(self.host_iterator)
        self.last_host_batch = {k: np.asarray(batch[k]) for k in self.skip if k in batch}
        return to_global(batch, self.sharding, skip=self.skip)

    def get_state(self) -> Dict[str, Any]:
        return self.host_iterator.get_state()

    def set_state(self, state: Dict[str, Any]) -> None:
        self.host_iterator.set_state(state)

    def close(self) -> None:
        close = getattr(self.host_iterator, "close", None)
        if close is not None:
            close()


def normalize_on_device(images_uint8: jax.Array, mean: Sequence[float], std: Sequence[float],
                        dtype: Any = None) -> jax.Array:
    """``(x / 255 − mean) / std`` for pipelines run with ``image_dtype="uint8"``.

    Computed in float32 (then cast to ``dtype``); may differ from the host's numpy result by an
    ulp because XLA may rewrite the divisions, which is far below any training effect.
    """
    import jax.numpy as jnp
    x = images_uint8.astype(jnp.float32) / 255.0
    x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
    return x if dtype is None else x.astype(dtype)
