"""Text-tower throughput: JAX vs open_clip, captions/s, same weights (MobileCLIP2-S0 by default).

    python benchmarks/text_tower.py [--model MobileCLIP2-S0] [--batch 256] [--reps 3]

Random-init open_clip model, its ``text`` weights loaded into the Flax tower through the
converter; real COCO captions (``../shared/data/coco_mini``) tokenized to the full context of
77, fp32, eval mode. The timed call is ``encode_text(ids, normalize=True)`` on both sides. Median
of ``--reps`` runs after a warm-up, the two frameworks alternating rep by rep (host drift
affects both alike); JAX compile time is reported separately. The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import numpy as np

COCO = (pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "coco_mini" / "annotations"
        / "captions_train2017.json")


def captions(n: int):
    if COCO.exists():
        caps = [a["caption"] for a in json.loads(COCO.read_text())["annotations"]]
    else:
        caps = ["a photo of a dog on a beach"]
    return [caps[i % len(caps)] for i in range(n)]


def _time_interleaved(fn_a, fn_b, reps):
    fn_a()
    fn_b()
    times_a, times_b = [], []
    for _ in range(reps):
        for fn, times in ((fn_a, times_a), (fn_b, times_b)):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times_a), statistics.median(times_b)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="MobileCLIP2-S0")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)

    import mobileclip2_jax
    from mobileclip2_jax.convert.torch_env import ensure_torchvision_importable
    from mobileclip2_jax.models.zoo import get_model_spec
    ensure_torchvision_importable()
    import open_clip
    import torch

    spec = get_model_spec(args.model)
    if spec.open_clip_name is None:
        raise SystemExit(f"{spec.name} has no open_clip reference (its text tower is Apple-only)")
    torch.manual_seed(0)
    ref = open_clip.create_model(spec.open_clip_name, pretrained=None).eval()
    import tempfile
    from safetensors.torch import save_file
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "model.safetensors"
        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
        model = mobileclip2_jax.create_model(spec.name, pretrained=path)
    ids = mobileclip2_jax.get_tokenizer(spec.name)(captions(args.batch))
    ids_t = torch.from_numpy(ids.astype(np.int64))

    t0 = time.perf_counter()
    model.encode_text(ids).block_until_ready()
    compile_s = time.perf_counter() - t0

    def run_torch():
        with torch.inference_mode():
            ref.encode_text(ids_t, normalize=True)

    t_torch, t_jax = _time_interleaved(run_torch, lambda: model.encode_text(ids).block_until_ready(),
                                       args.reps)
    with torch.inference_mode():
        diff = float(np.abs(np.asarray(model.encode_text(ids)) - ref.encode_text(ids_t, normalize=True).numpy()).max())
    results = {"model": spec.name, "batch": args.batch, "context_length": int(ids.shape[1]),
               "dtype": "float32", "jax_backend": jax.default_backend(), "jax": jax.__version__,
               "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
               "open_clip_captions_s": args.batch / t_torch, "jax_captions_s": args.batch / t_jax,
               "ratio_jax_over_open_clip": t_torch / t_jax, "jax_compile_s": compile_s,
               "max_abs_diff_normalized": diff}
    print(f"# {spec.name} text tower, batch {args.batch} x {ids.shape[1]} tokens, fp32; JAX "
          f"{jax.__version__} on {jax.default_backend()}, torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads")
    print(f"open_clip {results['open_clip_captions_s']:8.1f} captions/s   jax "
          f"{results['jax_captions_s']:8.1f} captions/s   ratio jax/open_clip "
          f"{results['ratio_jax_over_open_clip']:.2f}x   (jax compile {compile_s:.1f}s, "
          f"max |diff| {diff:.1e})")
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
