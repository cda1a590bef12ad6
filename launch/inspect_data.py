"""Validate a reinforced dataset (webdataset shards or TFDS ArrayRecord) before training on it.

    python launch/inspect_data.py PATH [--image-shards PATTERN] [--json] [--max-samples N]
                                       [--syn-text-key-regex RE] [--max-bad-fraction F]

PATH: a directory of ``*.tar`` shards (with ``reinforced_metadata.json``), a shard pattern such
as ``data/{00000000..00000099}.tar``, or a prepared TFDS ArrayRecord dataset directory.
Exit status: 0 trainable, 1 not trainable (problems listed), 2 unreadable input (bad path,
missing or invalid metadata).
"""
from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("path")
    parser.add_argument("--image-shards", default=None,
                        help="image+caption shards joined by key with image-less reinforced shards")
    parser.add_argument("--json", action="store_true", help="print the full report as JSON")
    parser.add_argument("--max-samples", type=int, default=None)
    parser.add_argument("--syn-text-key-regex", default=None,
                        help="the training regex for synthetic-caption keys (default ^syn_text.*$)")
    parser.add_argument("--max-bad-fraction", type=float, default=0.0,
                        help="share of bad samples still reported trainable (default 0)")
    parser.add_argument("--no-images", action="store_true",
                        help="skip image decoding (faster); also accepts image-less shards")
    args = parser.parse_args(argv)
    if args.max_samples is not None and args.max_samples < 1:
        parser.error(f"--max-samples must be ≥ 1; got {args.max_samples}")
    if not 0.0 <= args.max_bad_fraction <= 1.0:
        parser.error(f"--max-bad-fraction must be in [0, 1]; got {args.max_bad_fraction}")
    if args.syn_text_key_regex is not None:
        import re
        try:
            re.compile(args.syn_text_key_regex)
        except re.error as e:
            parser.error(f"--syn-text-key-regex {args.syn_text_key_regex!r} is not a valid regex ({e})")

    from mobileclip2_jax.data.inspection import format_report, inspect_dataset
    from mobileclip2_jax.data.pipeline import open_source
    from mobileclip2_jax.data.records import SchemaError
    from mobileclip2_jax.data.sampling import DEFAULT_SYN_TEXT_KEY_REGEX
    try:
        # --no-images also accepts image-less shards (DataCompDR ships none) without --image-shards
        source = open_source(args.path, image_shards=args.image_shards, require_image=not args.no_images)
        report = inspect_dataset(source, syn_text_key_regex=args.syn_text_key_regex or
                                 DEFAULT_SYN_TEXT_KEY_REGEX, max_samples=args.max_samples,
                                 max_bad_fraction=args.max_bad_fraction,
                                 decode_images=not args.no_images)
    except (SchemaError, FileNotFoundError, ValueError, OSError) as e:
        print(f"inspect_data: cannot read {args.path}: {e}", file=sys.stderr)
        if args.json:
            print(json.dumps({"path": args.path, "error": str(e), "trainable": False}))
        return 2
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0 if report["trainable"] else 1


if __name__ == "__main__":
    sys.exit(main())
