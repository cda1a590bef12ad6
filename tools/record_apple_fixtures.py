"""Records the Apple-package parity fixtures in ``tests/fixtures/`` from Apple's own code.

Apple's ``mobileclip`` package (apple/ml-mobileclip) is not pip-installable and its code is not
vendored here. This script extracts ``mobileclip/`` from a git checkout or mirror of
apple/ml-mobileclip into a temporary directory, builds ``mobileclip_s0`` and ``mobileclip_b``
from Apple's json configs, loads deterministic weights (``tests/fixtures/deterministic_weights.py``)
with ``strict=True``, and stores, per model, only what the tests compare against:

- ``apple_<model>.npz``: token ids, ``encode_image``/``encode_text`` outputs (fp32, eval
  mode) of the train-form model and of Apple's ``reparameterize_model`` copy;
- ``apple_<model>.json``: Apple commit, seed, weight digest, captions, parameter counts and
  the full state_dict key → shape lists of both forms.

Usage (torch, timm and open_clip from the project's venv)::

    JAX_PLATFORMS=cpu .venv/bin/python tools/record_apple_fixtures.py \
        --apple-git-dir /path/to/ml-mobileclip/.git [--out tests/fixtures] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
from typing import Dict

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))

import deterministic_weights as dw  # noqa: E402

MODELS = {"mobileclip_s0": 256, "mobileclip_b": 224}
N_IMAGES = 2
CAPTIONS = [
    "a photo of a dog",
    "two people riding bicycles down a busy city street at night",
    "",
    "a very long caption that will not fit " * 12,  # truncated: end-of-text at position 76
]


def extract_apple_package(git_dir: str, dest: pathlib.Path) -> str:
    commit = subprocess.check_output(["git", "--git-dir", git_dir, "rev-parse", "HEAD"], text=True).strip()
    archive = subprocess.check_output(["git", "--git-dir", git_dir, "archive", commit, "mobileclip"])
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return commit


def dump_json(meta: Dict) -> str:
    """JSON with one ``[key, shape]`` row per line for the state_dict listings (diff-friendly)."""
    meta = dict(meta)
    listings = {k: meta.pop(k) for k in ("state_dict_train", "state_dict_reparam")}
    parts = [json.dumps(meta, indent=1)[:-2]]
    for name, rows in listings.items():
        body = ",\n".join("  " + json.dumps(r) for r in rows)
        parts.append(f' "{name}": [\n{body}\n ]')
    return ",\n".join(parts) + "\n}\n"


def param_count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def record(name: str, size: int, seed: int, commit: str, out: pathlib.Path) -> None:
    import torch
    from mobileclip.clip import CLIP
    from mobileclip.modules.common.mobileone import reparameterize_model
    from mobileclip2_jax.tokenizers import ClipBpeTokenizer

    import mobileclip
    cfg = json.loads((pathlib.Path(mobileclip.__file__).parent / "configs" / f"{name}.json").read_text())
    model = CLIP(cfg).eval()
    key_shapes = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    weights = dw.state_dict_for(key_shapes, seed)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=True)
    assert all(p.dtype == torch.float32 for p in model.parameters())

    images = torch.from_numpy(dw.images_for(seed, N_IMAGES, size).transpose(0, 3, 1, 2).copy())
    ids = ClipBpeTokenizer()(CAPTIONS)
    tokens = torch.from_numpy(ids.astype(np.int64))
    fused = reparameterize_model(model)
    outputs: Dict[str, np.ndarray] = {}
    with torch.no_grad():
        for form, m in (("train", model), ("reparam", fused)):
            outputs[f"image_{form}"] = m.encode_image(images).numpy()
            outputs[f"text_{form}"] = m.encode_text(tokens).numpy()
    np.savez_compressed(out / f"apple_{name}.npz", ids=ids.astype(np.int32), **outputs)
    meta = {
        "model": name,
        "apple_commit": commit,
        "torch_version": torch.__version__,
        "seed": seed,
        "image_size": size,
        "n_images": N_IMAGES,
        "weights_digest": dw.digest(weights),
        "captions": CAPTIONS,
        "param_counts": {
            "image_train": param_count(model.image_encoder),
            "image_reparam": param_count(fused.image_encoder),
            "text_train": param_count(model.text_encoder),
            "text_reparam": param_count(fused.text_encoder),
        },
        "state_dict_train": key_shapes,
        "state_dict_reparam": [(k, list(v.shape)) for k, v in fused.state_dict().items()],
    }
    (out / f"apple_{name}.json").write_text(dump_json(meta))
    print(f"{name}: {len(key_shapes)} keys, |image| {np.abs(outputs['image_train']).max():.3f}, "
          f"|text| {np.abs(outputs['text_train']).max():.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--apple-git-dir", required=True, help="git dir of an apple/ml-mobileclip clone or mirror")
    ap.add_argument("--out", default=str(ROOT / "tests" / "fixtures"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from mobileclip2_jax.convert.torch_env import import_timm
    import_timm()  # torchvision shim before Apple's code imports timm/torchvision
    import torch
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        commit = extract_apple_package(args.apple_git_dir, pathlib.Path(tmp))
        sys.path.insert(0, tmp)
        for name, size in MODELS.items():
            record(name, size, args.seed, commit, pathlib.Path(args.out))


if __name__ == "__main__":
    main()
