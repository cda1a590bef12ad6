"""Importing the PyTorch reference (timm, open_clip) beside the CPU-only torch wheel.

The project pins ``torch==2.13.0`` (CPU) with ``torchvision==0.28.0`` so pip can never pull a
multi-GB CUDA torch. PyPI's torchvision 0.28.0 is a CUDA build whose C extension cannot load
beside CPU torch, which makes ``import torchvision`` (and so timm and open_clip) fail with
``RuntimeError: operator torchvision::nms does not exist``. Registering the two operator
*schemas* that torchvision's Python side refers to lets its pure-Python parts (transforms,
which timm and open_clip need) import; torchvision.ops kernels stay unavailable, and nothing
in MobileCLIP uses them. See ``shared/docs/environment.md`` §2.
"""
from __future__ import annotations

import os

_TV_LIB = None


def ensure_torchvision_importable() -> None:
    """Makes ``import torchvision``/``timm``/``open_clip`` work with CPU torch. Idempotent."""
    global _TV_LIB
    import torch
    try:
        _ = torch.ops.torchvision.nms  # the real extension loaded: nothing to do
        return
    except (AttributeError, RuntimeError):
        pass
    if _TV_LIB is None:
        _TV_LIB = torch.library.Library("torchvision", "DEF")
        _TV_LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _TV_LIB.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


def import_timm():
    """``import timm`` with the shim applied and hub access disabled (no downloads, ever)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ensure_torchvision_importable()
    import timm
    return timm
