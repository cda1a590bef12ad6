"""Runs the JAX MCi tower against timm on real photos and prints the agreement.

    python launch/parity_demo.py [--images ../shared/data/clothing/test] [--variant mci0]
"""
import argparse
import json
import sys


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", default="../shared/data/clothing/test")
    p.add_argument("--variant", default="mci0", help="mci0 … mci4")
    p.add_argument("--num-images", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--tolerance", type=float, default=1e-5, help="max relative error allowed")
    args = p.parse_args()
    if args.num_images < 1 or args.batch_size < 1:
        p.error(f"--num-images and --batch-size must be >= 1 (got {args.num_images}, {args.batch_size})")
    from mobileclip2_jax.eval.tower_parity import run_tower_parity
    try:
        report = run_tower_parity(args.images, args.variant, args.num_images, args.batch_size)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ok = all(f["max_rel_err"] <= args.tolerance for f in report["forms"].values())
    for form, f in report["forms"].items():
        print(f"{report['variant']} {form:16s} max rel err {f['max_rel_err']:.2e}  min cosine "
              f"{f['min_cosine']:.8f}  max similarity diff {f['max_similarity_diff']:.1e}  "
              f"timm {f['timm_img_s']:.1f} img/s  jax {f['jax_img_s']:.1f} img/s")
    print(json.dumps(report))
    print("PARITY OK" if ok else f"PARITY FAILED (tolerance {args.tolerance})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
