"""MCi image-tower forward throughput: JAX vs timm, train and reparameterized forms.

    python benchmarks/image_tower.py [--variants mci0 mci2] [--batch 32] [--size 256] [--reps 3]

Same weights on both sides (random init, timm → Flax through the converter), fp32, eval mode.
Prints one line per (variant, form, framework) with img/s, a ratio line per form, and as the
last line one JSON object with every figure. Median of ``--reps`` timed runs after one
warm-up, timm and JAX alternating rep by rep so host drift affects both alike (JAX compile
time is reported separately and excluded from img/s).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np


def _time_interleaved(fn_a, fn_b, reps):
    """Median seconds of ``fn_a`` and ``fn_b``, timed alternately after one warm-up each.

    Alternating the two frameworks rep by rep exposes both to the same host conditions: on a
    shared VM throughput drifts by ±30 % over minutes, which would otherwise bias the ratio.
    """
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
    p.add_argument("--variants", nargs="+", default=["mci0", "mci2"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--depthwise-impl", default="auto", choices=["auto", "shift_add", "xla"])
    args = p.parse_args(argv)

    from mobileclip2_jax.convert.mci_layout import mci_from_torch
    from mobileclip2_jax.convert.torch_env import import_timm
    from mobileclip2_jax.models.depthwise import resolve_impl
    from mobileclip2_jax.models.mci import MCi, get_mci_config
    from mobileclip2_jax.models.reparam import reparameterize
    timm = import_timm()
    import torch
    from timm.utils.model import reparameterize_model

    results = {"batch": args.batch, "size": args.size, "dtype": "float32",
               "jax_backend": jax.default_backend(), "depthwise_impl": resolve_impl(args.depthwise_impl),
               "torch_threads": torch.get_num_threads(), "jax": jax.__version__,
               "torch": torch.__version__, "timm": timm.__version__, "figures": {}}
    print(f"# batch {args.batch}, {args.size}px, fp32; JAX {jax.__version__} on "
          f"{jax.default_backend()} (depthwise: {results['depthwise_impl']}), torch "
          f"{torch.__version__} with {torch.get_num_threads()} threads", flush=True)
    x_np = np.random.default_rng(0).standard_normal((args.batch, 3, args.size, args.size)).astype(np.float32)
    x_t = torch.from_numpy(x_np)
    x_j = jax.device_put(jnp.asarray(x_np.transpose(0, 2, 3, 1)))
    for variant in args.variants:
        cfg = get_mci_config(variant)
        torch.manual_seed(0)
        model = timm.create_model(f"fastvit_{variant}", num_classes=cfg.num_classes).eval()
        variables = mci_from_torch(model.state_dict(), cfg)
        fused = reparameterize_model(model)
        forms = {"train": (model, MCi(cfg, depthwise_impl=args.depthwise_impl), variables),
                 "reparam": (fused, MCi(cfg, inference_mode=True, depthwise_impl=args.depthwise_impl),
                             reparameterize(variables))}
        for form, (tmodel, jmodel, jvars) in forms.items():
            def run_torch():
                with torch.inference_mode():
                    tmodel(x_t)
            apply = jax.jit(jmodel.apply)
            t0 = time.perf_counter()
            compiled = apply.lower(jvars, x_j).compile()
            compile_s = time.perf_counter() - t0
            t_torch, t_jax = _time_interleaved(
                run_torch, lambda: compiled(jvars, x_j).block_until_ready(), args.reps)
            fig = {"timm_img_s": args.batch / t_torch, "jax_img_s": args.batch / t_jax,
                   "ratio_jax_over_timm": t_torch / t_jax, "jax_compile_s": compile_s}
            results["figures"][f"{variant}_{form}"] = fig
            print(f"{variant:5s} {form:8s} timm {fig['timm_img_s']:7.2f} img/s   "
                  f"jax {fig['jax_img_s']:7.2f} img/s   ratio jax/timm {fig['ratio_jax_over_timm']:5.2f}x"
                  f"   (jax compile {compile_s:.1f}s)", flush=True)
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
