"""Parity of a JAX MCi tower with timm's on real photos: the project's current main job.

Loads real images, preprocesses them as MobileCLIP2 does for MCi towers (shortest side → 256,
bilinear, centre crop, raw [0, 1] pixels as for MobileCLIP2-S0/S2), builds timm's
``fastvit_mci*`` with random weights and randomized BatchNorm statistics (released weights
cannot be downloaded here), converts them with the strict key table, and compares the
embeddings of the JAX train form and of the reparameterized form against timm's. Reports
per-form max relative error, cosine agreement, agreement of the image-image similarity
matrices, and img/s.
"""
from __future__ import annotations

import pathlib
import time
from typing import Dict, List

import numpy as np
from PIL import Image

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp"}


def find_images(root: str, limit: int) -> List[pathlib.Path]:
    """Up to ``limit`` images under ``root``, spread over its sub-folders (classes)."""
    path = pathlib.Path(root)
    if not path.exists():
        raise FileNotFoundError(f"image folder {root!r} does not exist (expected a folder of "
                                f"images, e.g. ../shared/data/clothing/test)")
    if not path.is_dir():
        raise NotADirectoryError(f"{root!r} is a file; expected a folder of images "
                                 f"(searched recursively), e.g. ../shared/data/clothing/test")
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_EXTS))}) under {root!r}")
    by_dir: Dict[pathlib.Path, List[pathlib.Path]] = {}
    for f in files:
        by_dir.setdefault(f.parent, []).append(f)
    picked, i = [], 0
    while len(picked) < min(limit, len(files)):
        for d in sorted(by_dir):
            if i < len(by_dir[d]) and len(picked) < limit:
                picked.append(by_dir[d][i])
        i += 1
    return picked


def load_image(path: pathlib.Path, size: int) -> np.ndarray:
    """Shortest side → ``size`` (bilinear), centre crop, RGB float32 in [0, 1], HWC."""
    try:
        img = Image.open(path).convert("RGB")
    except Exception as e:  # PIL raises several types for corrupt files
        raise ValueError(f"cannot decode image {path}: {e}") from e
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, np.float32) / 255.0


def run_tower_parity(image_dir: str, variant: str = "mci0", num_images: int = 16,
                     batch_size: int = 8, size: int = 256, seed: int = 0) -> Dict:
    import jax
    import jax.numpy as jnp
    from mobileclip2_jax.convert.mci_layout import mci_from_torch
    from mobileclip2_jax.convert.torch_env import import_timm
    from mobileclip2_jax.models.mci import MCi, get_mci_config
    from mobileclip2_jax.models.reparam import reparameterize
    timm = import_timm()
    import torch
    from timm.utils.model import reparameterize_model

    if num_images < 1 or batch_size < 1:
        raise ValueError(f"num_images and batch_size must be >= 1, got {num_images}, {batch_size}")
    cfg = get_mci_config(variant)  # validate the variant before any work
    files = find_images(image_dir, num_images)
    print(f"[parity] {len(files)} images from {image_dir}", flush=True)
    images = np.stack([load_image(f, size) for f in files])
    torch.manual_seed(seed)
    model = timm.create_model(f"fastvit_{variant}", num_classes=cfg.num_classes).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(0.05 + 0.15 * torch.rand(p.shape, generator=g))
    fused_model = reparameterize_model(model)
    variables = mci_from_torch(model.state_dict(), cfg)
    forms = {"train": (model, MCi(cfg), variables),
             "reparameterized": (fused_model, MCi(cfg, inference_mode=True), reparameterize(variables))}
    report = {"variant": variant, "images": len(files), "image_size": size, "forms": {}}
    for form, (tmodel, jmodel, jvars) in forms.items():
        apply = jax.jit(jmodel.apply)
        outs_t, outs_j, t_torch, t_jax = [], [], 0.0, 0.0
        n_batches = (len(images) + batch_size - 1) // batch_size
        for b in range(n_batches):
            batch = images[b * batch_size:(b + 1) * batch_size]
            xt = torch.from_numpy(batch.transpose(0, 3, 1, 2).copy())
            xj = jnp.asarray(batch)
            # The matmul-precision setting is part of jit's cache key: warm up (compile) under
            # the same setting as the timed call, and warm up torch too, before timing batch 0.
            with jax.default_matmul_precision("highest"):
                if b == 0:
                    apply(jvars, xj).block_until_ready()
                    with torch.inference_mode():
                        tmodel(xt)
                t = time.perf_counter()
                outs_j.append(np.asarray(apply(jvars, xj)))
                t_jax += time.perf_counter() - t
            t = time.perf_counter()
            with torch.inference_mode():
                outs_t.append(tmodel(xt).numpy())
            t_torch += time.perf_counter() - t
            print(f"[parity] {form}: batch {b + 1}/{n_batches}", flush=True)
        ref, ours = np.concatenate(outs_t), np.concatenate(outs_j)
        rel = float(np.abs(ours - ref).max() / np.abs(ref).max())
        unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)
        cos = float((unit(ours) * unit(ref)).sum(1).min())
        # Retrieval-style check: image-image cosine similarities agree. (Nearest-neighbour ranks
        # are not used: random-weight embeddings are nearly collinear, so ranks flip on rounding.)
        sim_diff = float(np.abs(unit(ours) @ unit(ours).T - unit(ref) @ unit(ref).T).max())
        report["forms"][form] = {"max_rel_err": rel, "min_cosine": cos,
                                 "max_similarity_diff": sim_diff,
                                 "timm_img_s": len(images) / t_torch, "jax_img_s": len(images) / t_jax}
    return report
