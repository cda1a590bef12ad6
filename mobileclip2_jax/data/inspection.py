"""Validate a reinforced dataset before an expensive pod run (``launch/inspect_data.py``).

A pod run that dies at step 40k on a malformed shard, or silently trains against teacher
embeddings split at the wrong column, wastes far more than a pass over the data on one host.
:func:`inspect_dataset` reads every record exactly as the training pipeline does — decode,
validate against the metadata, decode the image, check every stored crop box against the image —
and reports what a user needs to decide whether to launch:

* sample count, the member keys present, teachers with their dims and default logit scales;
* augmentations and synthetic captions per sample (min / mean / max, per synthetic key);
* the per-teacher norm of the stored embeddings (each teacher's block is L2-normalized at
  generation, so norms far from 1 mean the metadata's dims do not match the data);
* crop boxes reaching outside their image (replayed with black padding, as torchvision does,
  but usually a sign that the image is not byte-identical to the one the teacher saw);
* bad samples by kind, with the shard and key of each.

``trainable`` is False (and the CLI exits non-zero) when there is no metadata, no good sample,
no synthetic key matching the training regex, or more than ``max_bad_fraction`` bad samples.
"""
from __future__ import annotations

import collections
import json
import os
import re
import sys
import time
from typing import Any, Dict, List, Optional, TextIO

import numpy as np

from mobileclip2_jax.data.augment import crop_padding_pixels, decode_aug_params
from mobileclip2_jax.data.records import BadSample, DatasetMetadata, decode_image
from mobileclip2_jax.data.sampling import DEFAULT_SYN_TEXT_KEY_REGEX

NORM_TOLERANCE = 0.02  # bf16 storage keeps unit norms to ~0.5 %; fp32 to 1e-6


class _Summary:
    """Running min / mean / max of a count."""

    def __init__(self):
        self.n, self.total, self.lo, self.hi = 0, 0.0, None, None

    def add(self, v: float) -> None:
        self.n += 1
        self.total += v
        self.lo = v if self.lo is None else min(self.lo, v)
        self.hi = v if self.hi is None else max(self.hi, v)

    def to_dict(self) -> Dict[str, Any]:
        if not self.n:
            return {"min": None, "mean": None, "max": None}
        return {"min": self.lo, "mean": round(self.total / self.n, 4), "max": self.hi}


def _progress(out: Optional[TextIO], done: int, total: int, start: float, bad: int) -> None:
    if out is None:
        return
    elapsed = time.monotonic() - start
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = (total - done) / rate if rate > 0 else float("inf")
    print(f"[inspect] {done}/{total} samples  {rate:.1f}/s  ETA {eta:.0f}s  bad {bad}",
          file=out, flush=True)


def inspect_dataset(source: Any, *, syn_text_key_regex: str = DEFAULT_SYN_TEXT_KEY_REGEX,
                    max_samples: Optional[int] = None, max_bad_fraction: float = 0.0,
                    max_listed: int = 1000, decode_images: bool = True,
                    progress: Optional[TextIO] = sys.stderr, progress_every: int = 500
                    ) -> Dict[str, Any]:
    """Reads every record of ``source`` (a reinforced source, see ``pipeline.open_source``).

    ``max_bad_fraction``: the share of bad samples still considered trainable (default 0: any
    bad sample makes the report non-trainable, so a user looks before launching; the training
    pipeline itself skips and counts them).
    """
    metadata: DatasetMetadata = source.metadata
    n_total = len(source)
    n = n_total if max_samples is None else min(n_total, max_samples)
    regex = re.compile(syn_text_key_regex)
    members: collections.Counter = collections.Counter()
    n_aug, n_gt = _Summary(), _Summary()
    syn_per_key: Dict[str, _Summary] = collections.defaultdict(_Summary)
    norms = [_Summary() for _ in metadata.teachers]
    layouts: collections.Counter = collections.Counter()
    bad_by_kind: collections.Counter = collections.Counter()
    bad_list: List[Dict[str, Any]] = []
    good = matched = out_of_image = padded_views = 0
    image_sizes = _Summary()
    start = time.monotonic()
    for i in range(n):
        raw = source[i]
        key = raw.get("__key__") if isinstance(raw, dict) else None
        where = raw.get("__source__") if isinstance(raw, dict) else None
        if isinstance(raw, dict):
            members.update(k for k in raw if not k.startswith("__"))
        try:
            rec = source.decode(raw)
            key = rec.key
            if decode_images:
                img = decode_image(rec.image, key=key, source=where)
                w, h = img.size
                image_sizes.add(min(w, h))
                pads = [crop_padding_pixels(w, h, *decode_aug_params(p).box) for p in rec.param_aug]
                padded_views += sum(p > 0 for p in pads)
                out_of_image += any(p > 0 for p in pads)
        except BadSample as e:
            e = e.located(key=key, source=where)
            bad_by_kind[e.kind] += 1
            if len(bad_list) < max_listed:
                bad_list.append({"index": i, "source": e.source, "key": e.key, "kind": e.kind,
                                 "message": e.detail})
        else:
            good += 1
            n_aug.add(rec.n_aug)
            n_gt.add(len(rec.captions))
            layouts[rec.text_emb_layout] += 1
            keys = [k for k in rec.syn_texts if regex.match(k) and rec.syn_texts[k]]
            matched += bool(keys)
            for k, v in rec.syn_texts.items():
                syn_per_key[k].add(len(v))
            for t, (lo, hi) in enumerate(metadata.blocks()):
                for row in np.asarray(rec.image_emb)[:, lo:hi]:
                    norms[t].add(float(np.linalg.norm(row)))
        if progress is not None and (i + 1) % progress_every == 0:
            _progress(progress, i + 1, n, start, sum(bad_by_kind.values()))
    if progress is not None and n % progress_every:
        _progress(progress, n, n, start, sum(bad_by_kind.values()))

    n_bad = sum(bad_by_kind.values())
    problems = []
    if good == 0:
        problems.append("no readable sample")
    if good and matched == 0:
        problems.append(f"no sample has a synthetic-caption key matching {syn_text_key_regex!r} "
                        f"(keys seen: {sorted(syn_per_key)})")
    elif good and matched < good:
        problems.append(f"{good - matched} good samples have no synthetic key matching "
                        f"{syn_text_key_regex!r}; training skips them")
    if n and n_bad > max_bad_fraction * n:
        problems.append(f"{n_bad} of {n} samples are bad (allowed: {max_bad_fraction:.1%})")
    if max_samples is None or max_samples >= n_total:
        problems.extend(_count_problems(source, metadata, n_total))
    for t, (teacher, s) in enumerate(zip(metadata.teachers, norms)):
        if s.n and (abs(s.lo - 1) > NORM_TOLERANCE or abs(s.hi - 1) > NORM_TOLERANCE):
            problems.append(f"teacher {teacher.name!r} (columns {metadata.blocks()[t]}): image "
                            f"embedding norms span [{s.lo:.3f}, {s.hi:.3f}], expected ≈1 — the "
                            f"metadata's teacher dims may not match the data")
    return {
        "source": repr(source),
        "samples": n_total, "inspected": n, "good_samples": good, "bad_samples": n_bad,
        "bad_by_kind": dict(sorted(bad_by_kind.items())), "bad_listed": bad_list,
        "member_keys": dict(sorted(members.items())),
        "teachers": [{"name": t.name, "dim": t.dim, "logit_scale": t.logit_scale,
                      "columns": list(b)} for t, b in zip(metadata.teachers, metadata.blocks())],
        "embed_dim": metadata.embed_dim,
        "text_emb_layout": dict(layouts), "metadata_text_emb_layout": metadata.text_emb_layout,
        "augmentations_per_sample": n_aug.to_dict(),
        "gt_captions_per_sample": n_gt.to_dict(),
        "synthetic_captions_per_sample": {k: v.to_dict() for k, v in sorted(syn_per_key.items())},
        "syn_text_key_regex": syn_text_key_regex, "samples_with_matching_syn_key": matched,
        "image_emb_norm_per_teacher": {t.name: s.to_dict() for t, s in zip(metadata.teachers, norms)},
        "image_min_side": image_sizes.to_dict(),
        "samples_with_crop_outside_image": out_of_image, "views_with_crop_outside_image": padded_views,
        "problems": problems,
        "trainable": not any(p for p in problems if "training skips" not in p),
        "seconds": round(time.monotonic() - start, 3),
    }


def _count_problems(source: Any, metadata: DatasetMetadata, n_found: int) -> List[str]:
    """Records the reader found vs what the metadata and the generator's manifest promise: a
    shard cut short (a crashed copy) loses records silently otherwise."""
    out = []
    if metadata.num_samples is not None and metadata.num_samples != n_found:
        out.append(f"the metadata says {metadata.num_samples} samples but {n_found} records were found "
                   f"(missing or truncated shards?)")
    shard_paths = getattr(source, "shard_paths", None)
    if shard_paths:
        manifest = os.path.join(os.path.dirname(shard_paths[0]), "manifest.jsonl")
        if os.path.isfile(manifest):
            try:
                with open(manifest, encoding="utf-8") as f:
                    entries = [json.loads(line) for line in f if line.strip()]
                promised = {e["shard"]: int(e["num_uids"]) for e in entries}
            except (ValueError, KeyError, TypeError) as e:
                return out + [f"{manifest}: unreadable ({e})"]
            counts = collections.Counter(os.path.basename(source.shard_of(i))[:-len(".tar")]
                                         for i in range(n_found)) if hasattr(source, "shard_of") else None
            if counts is not None:
                for shard, n in sorted(promised.items()):
                    if counts.get(shard, 0) != n:
                        out.append(f"{manifest}: shard {shard} should hold {n} records; {counts.get(shard, 0)} "
                                   f"were read")
    return out


def format_report(report: Dict[str, Any]) -> str:
    """Human-readable summary of :func:`inspect_dataset`'s report."""
    lines = [f"dataset      {report['source']}",
             f"samples      {report['samples']} ({report['inspected']} inspected): "
             f"{report['good_samples']} good, {report['bad_samples']} bad",
             "members      " + ", ".join(f"{k}×{v}" for k, v in report["member_keys"].items()),
             "teachers     " + "; ".join(f"{t['name']} dim {t['dim']} scale {t['logit_scale']:g} "
                                          f"cols {t['columns'][0]}:{t['columns'][1]}"
                                          for t in report["teachers"]),
             f"layout       {report['text_emb_layout']} (metadata: "
             f"{report['metadata_text_emb_layout']})",
             f"augs/sample  {report['augmentations_per_sample']}",
             f"syn/sample   {report['synthetic_captions_per_sample']} "
             f"(regex {report['syn_text_key_regex']!r} matches "
             f"{report['samples_with_matching_syn_key']})",
             f"emb norms    {report['image_emb_norm_per_teacher']}",
             f"crops        {report['samples_with_crop_outside_image']} samples / "
             f"{report['views_with_crop_outside_image']} views reach outside their image"]
    if report["bad_samples"]:
        lines.append(f"bad          {report['bad_by_kind']}")
        for b in report["bad_listed"]:
            lines.append(f"  - {b['source']}:{b['key']} [{b['kind']}] {b['message']}")
    for p in report["problems"]:
        lines.append(f"PROBLEM      {p}")
    lines.append("TRAINABLE" if report["trainable"] else "NOT TRAINABLE")
    return "\n".join(lines)
