"""The training mesh: axes ``("data", "fsdp")``, batch sharded over both.

``data`` replicates parameters and splits the batch; ``fsdp`` splits the batch *and* the large
parameters (and their optimizer state), so MobileCLIP-S3/S4/L-14 fit in device memory at pod
batch sizes. The batch is always sharded over both axes (:data:`BATCH_AXES`), so every device
sees a distinct slice of the global batch whatever the split.
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")


def make_mesh(data: int = -1, fsdp: int = 1, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A ``data × fsdp`` mesh over ``devices`` (default: all devices of all processes).

    ``-1`` for one axis takes the remaining devices. Devices are laid out in the order
    ``jax.devices()`` gives (process-major), so each host's devices form contiguous ``data`` rows
    when ``fsdp`` divides the local device count — FSDP all-gathers then stay inside a host.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if data == -1 and fsdp == -1:
        raise ValueError("at most one of data / fsdp may be -1")
    if data == -1:
        if fsdp < 1 or n % fsdp:
            raise ValueError(f"fsdp={fsdp} does not divide the {n} devices")
        data = n // fsdp
    elif fsdp == -1:
        if data < 1 or n % data:
            raise ValueError(f"data={data} does not divide the {n} devices")
        fsdp = n // data
    if data < 1 or fsdp < 1 or data * fsdp != n:
        raise ValueError(f"mesh data={data} × fsdp={fsdp} = {data * fsdp} does not match the {n} devices")
    return Mesh(np.asarray(devices, dtype=object).reshape(data, fsdp), AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis over ``data`` and ``fsdp``; other axes replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def logits_row_sharding(mesh: Mesh) -> NamedSharding:
    """``B × B`` logits: row blocks over the batch axes (see :mod:`mobileclip2_jax.losses`)."""
    return NamedSharding(mesh, P(BATCH_AXES, None))
