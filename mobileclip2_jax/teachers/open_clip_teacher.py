"""Any open_clip model as a teacher, run through PyTorch (the ``torch`` extra).

This is how the released datasets were made (DataCompDR: ViT-L-14 ``datacomp_xl_s13b_b90k`` +
``openai``; DFNDR: DFN ViT-L/H teachers), so a user can rebuild or extend them with the exact
teacher models. ``model`` is an open_clip model name (weights from ``checkpoint``, a
``.pt``/``.bin``/``.safetensors`` state_dict) or ``local-dir:DIR`` (an ``open_clip_config.json``
plus weights, as ``launch/convert.py`` writes). ``.pt`` files are read with
``torch.load(weights_only=True)`` — never an unrestricted unpickle — and loaded strictly.
The view is replayed here (numpy) at the model's own size and mean/std; torch only runs the
towers, on CUDA when present.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Sequence

import numpy as np

from mobileclip2_jax.data.preprocess import PreprocessConfig
from mobileclip2_jax.teachers.base import check_embeddings, run_fixed_batches


def _unwrap(state_dict: Dict[str, Any]) -> Dict[str, Any]:
    """``{"state_dict": …}`` and DDP ``module.`` prefixes, as open_clip's own loader strips."""
    if isinstance(state_dict.get("state_dict"), dict):
        state_dict = state_dict["state_dict"]
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


class OpenClipTeacher:
    def __init__(self, model: str, checkpoint: Optional[str] = None, *, batch_size: int = 64,
                 label: Optional[str] = None, logit_scale: Optional[float] = None,
                 allow_random_init: bool = False, device: Optional[str] = None):
        from mobileclip2_jax.convert.torch_env import ensure_torchvision_importable
        try:
            ensure_torchvision_importable()
            import open_clip
            import torch
        except ImportError as e:
            raise ImportError(f"open_clip teacher {model!r} needs PyTorch and open_clip: "
                              f"pip install '.[torch]' ({e})") from None
        self._torch = torch
        local = model.startswith("local-dir:")
        if checkpoint is None and not local and not allow_random_init:
            raise ValueError(f"open_clip teacher {model!r}: no checkpoint file given (this package "
                             f"never downloads weights); allow_random_init=True for smoke tests only")
        if local and not os.path.isdir(model[len("local-dir:"):]):
            raise FileNotFoundError(f"open_clip teacher {model!r}: directory not found")
        net = open_clip.create_model(model, pretrained=None, device="cpu")
        if checkpoint is not None:
            from mobileclip2_jax.factory import load_torch_checkpoint
            sd = _unwrap(load_torch_checkpoint(checkpoint))
            sd = {k: torch.as_tensor(np.asarray(v)) if not torch.is_tensor(v) else v for k, v in sd.items()}
            missing, unexpected = net.load_state_dict(sd, strict=False)
            if missing or unexpected:
                raise ValueError(f"{checkpoint}: does not match open_clip model {model!r} "
                                 f"(missing {list(missing)[:5]}…, unexpected {list(unexpected)[:5]}…)")
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.net = net.eval().to(self.device)
        cfg = open_clip.get_model_preprocess_cfg(net)
        size = cfg.get("size", 224)
        size = int(size[0] if isinstance(size, (list, tuple)) else size)
        self.preprocess = PreprocessConfig(size, tuple(cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))),
                                           tuple(cfg.get("std", (0.26862954, 0.26130258, 0.27577711))),
                                           cfg.get("interpolation", "bicubic"))
        self.tokenizer = open_clip.get_tokenizer(model)
        with torch.no_grad():
            probe = self.net.encode_text(self.tokenizer(["a"]).to(self.device))
        self.dim = int(probe.shape[-1])
        self.model_name, self.checkpoint = model, checkpoint
        self.name = label or (model if checkpoint is None else f"{model}:{os.path.basename(checkpoint)}")
        self.logit_scale = (float(logit_scale) if logit_scale is not None
                            else float(self.net.logit_scale.exp().item()))
        self.source = str(checkpoint) if checkpoint else (model if local else f"random-init ({model})")
        self.batch_size = int(batch_size)

    def _run(self, fn, x):
        torch = self._torch
        with torch.no_grad():
            return fn(torch.from_numpy(np.ascontiguousarray(x)).to(self.device)).float().cpu().numpy()

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images, np.float32)
        s = self.preprocess.image_size
        if images.ndim != 4 or images.shape[1:] != (s, s, 3):
            raise ValueError(f"teacher {self.name!r}: expected views (N, {s}, {s}, 3); got {images.shape}")
        nchw = lambda x: self._run(lambda t: self.net.encode_image(t.permute(0, 3, 1, 2), normalize=True), x)  # noqa: E731
        out = run_fixed_batches(nchw, images, self.batch_size, np.zeros(images.shape[1:], np.float32))
        return check_embeddings(out, len(images), self.dim, f"teacher {self.name!r} images")

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        ids = self.tokenizer(list(texts)).numpy()
        pad = self.tokenizer([""]).numpy()[0]
        out = run_fixed_batches(lambda x: self._run(lambda t: self.net.encode_text(t, normalize=True), x),
                                ids, self.batch_size, pad)
        return check_embeddings(out, len(ids), self.dim, f"teacher {self.name!r} texts")

    def describe(self) -> Dict[str, Any]:
        p = self.preprocess
        return {"kind": "open_clip", "model": self.model_name, "checkpoint": self.checkpoint,
                "image_size": p.image_size, "mean": list(p.mean), "std": list(p.std),
                "tokenizer": "open_clip", "device": self.device}
