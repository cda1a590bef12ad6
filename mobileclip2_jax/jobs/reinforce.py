"""The ``launch/reinforce.py`` job: build source, captions, teachers from a config and run.

Config schema (``configs/reinforce/*.py`` build it; every key is overridable from the command
line, e.g. ``--config.teachers[0].checkpoint=/ckpt/s4 --config.output.samples_per_shard=500``):

``mode``            ``"generate"`` (a new dataset from images + captions) or ``"add_teacher"``
``output_dir``      where shards, reports and metadata go
``source``          kind ``coco`` (annotations, image_dir) | ``imagefolder`` (root, templates) |
                    ``tar`` (pattern: image+caption webdataset shards); ``max_items`` (0 = all)
``input_dir``, ``image_shards``   add_teacher: the existing dataset (+ its image shards)
``synthetic``       list of providers (:mod:`mobileclip2_jax.data.synthetic_captions`)
``augmentation``    num_augs, seed and the RandomResizedCrop/RandAugment parameters
``teachers``        list of {kind: zoo|open_clip, model, checkpoint, image_size, batch_size,
                    label, logit_scale, allow_random_init}
``output``          samples_per_shard, embedding_format, text_emb_layout, gt_captions,
                    store_images, arrayrecord_dir
``run``             replay_threads, chunk_records, max_bad_fraction, progress_every_s
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple

from mobileclip2_jax.data.aug_sampling import AugSamplingConfig
from mobileclip2_jax.data.reinforce import (GenerationSpec, Generator, finalize, generation_metadata,
                                            num_shards)
from mobileclip2_jax.data.synthetic_captions import SyntheticCaptions

SOURCE_KINDS = ("coco", "imagefolder", "tar")
TEACHER_KINDS = ("zoo", "open_clip")


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    return default if value is None else value


class _Limited:
    """The first ``n`` items of a source (smoke runs); keeps ``keys()`` and ``repr``."""

    def __init__(self, source: Any, n: int):
        self.source, self.n = source, min(n, len(source))
        self.skipped = getattr(source, "skipped", [])

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.source[i]

    def keys(self) -> List[str]:
        return self.source.keys()[:self.n]

    def __repr__(self) -> str:
        return f"{self.source!r}[:{self.n}]"


def build_source(cfg: Any) -> Tuple[Any, Dict[str, Any]]:
    """``(source, description)``; description goes into the plan and the metadata."""
    from mobileclip2_jax.data import sources
    kind = _get(cfg, "kind")
    if kind == "coco":
        src = sources.CocoCaptionsSource(_get(cfg, "annotations", ""), _get(cfg, "image_dir", ""))
        desc = {"kind": kind, "annotations": src.annotations_json, "image_dir": src.image_dir}
    elif kind == "imagefolder":
        templates = tuple(_get(cfg, "templates", ())) or sources.DEFAULT_TEMPLATES
        names = dict(_get(cfg, "class_names", {}) or {}) or None
        src = sources.ImageFolderSource(_get(cfg, "root", ""), templates, names)
        desc = {"kind": kind, "root": src.root, "templates": list(templates)}
    elif kind == "tar":
        from mobileclip2_jax.data.tar_index import expand_shards
        paths = expand_shards(_get(cfg, "pattern", ""))
        src = sources.ImageTextTarSource(paths)
        desc = {"kind": kind, "shards": src.tar_paths}
    else:
        raise ValueError(f"config.source.kind must be one of {SOURCE_KINDS}; got {kind!r}")
    max_items = int(_get(cfg, "max_items", 0))
    if max_items < 0:
        raise ValueError(f"config.source.max_items must be ≥ 0 (0 = all); got {max_items}")
    if max_items > 0:
        src = _Limited(src, max_items)
        desc["max_items"] = max_items
    desc["skipped_at_indexing"] = [dataclasses.asdict(s) for s in getattr(src, "skipped", [])][:1000]
    return src, desc


def build_captions(cfgs: Any) -> List[SyntheticCaptions]:
    out = []
    for i, c in enumerate(cfgs or []):
        try:
            out.append(SyntheticCaptions(
                _get(c, "kind", "other_captions"), _get(c, "key", "syn_text"),
                json_path=_get(c, "json_path", "") or None, templates=tuple(_get(c, "templates", ())),
                factory=_get(c, "factory", "") or None, max_per_image=_get(c, "max_per_image", 0) or None,
                options=dict(_get(c, "options", {}) or {})))
        except (ValueError, TypeError, FileNotFoundError, ImportError) as e:
            raise type(e)(f"config.synthetic[{i}]: {e}") from None
    return out


def build_spec(cfg: Any) -> GenerationSpec:
    try:
        return _build_spec(cfg)
    except (ValueError, TypeError) as e:
        raise ValueError(f"config.augmentation / config.output: {e}") from None


def _build_spec(cfg: Any) -> GenerationSpec:
    a, o, r = cfg.augmentation, cfg.output, cfg.get("run", {})
    aug = AugSamplingConfig(crop_size=int(a.crop_size), scale=tuple(a.scale), ratio=tuple(a.ratio),
                            num_ops=int(a.num_ops), magnitude=int(a.magnitude),
                            num_magnitude_bins=int(a.num_magnitude_bins),
                            randaugment_p=float(a.randaugment_p), interpolation=str(a.interpolation))
    return GenerationSpec(num_augs=int(a.num_augs), augmentation=aug, seed=int(a.seed),
                          samples_per_shard=int(o.samples_per_shard), gt_captions=str(o.gt_captions),
                          text_emb_layout=str(o.text_emb_layout), embedding_format=str(o.embedding_format),
                          store_images=bool(o.store_images), chunk_records=int(_get(r, "chunk_records", 16)))


def build_teacher(cfg: Any, index: int = 0) -> Any:
    """A :class:`~mobileclip2_jax.teachers.base.TeacherModel` from one ``config.teachers`` entry."""
    kind = _get(cfg, "kind", "zoo")
    common = dict(batch_size=int(_get(cfg, "batch_size", 64)), label=_get(cfg, "label", "") or None,
                  logit_scale=_get(cfg, "logit_scale", None),
                  allow_random_init=bool(_get(cfg, "allow_random_init", False)))
    checkpoint = _get(cfg, "checkpoint", "") or None
    if common["batch_size"] < 1:
        raise ValueError(f"config.teachers[{index}].batch_size must be ≥ 1; got {common['batch_size']}")
    if kind == "open_clip" and _get(cfg, "image_size", None) is not None:
        raise ValueError(f"config.teachers[{index}].image_size: an open_clip teacher runs at its own "
                         f"configured size (open_clip_config.json); leave image_size unset")
    try:
        if kind == "zoo":
            from mobileclip2_jax.teachers.zoo_teacher import ZooTeacher
            return ZooTeacher(_get(cfg, "model"), checkpoint, image_size=_get(cfg, "image_size", None),
                              seed=int(_get(cfg, "seed", 0)), **common)
        if kind == "open_clip":
            from mobileclip2_jax.teachers.open_clip_teacher import OpenClipTeacher
            return OpenClipTeacher(_get(cfg, "model"), checkpoint, **common)
    except (ValueError, FileNotFoundError, ImportError, RuntimeError) as e:  # open_clip: RuntimeError
        cls = ValueError if isinstance(e, RuntimeError) else type(e)
        raise cls(f"config.teachers[{index}] ({kind} {_get(cfg, 'model')!r}): {e}") from None
    raise ValueError(f"config.teachers[{index}].kind must be one of {TEACHER_KINDS}; got {kind!r}")


def _arrayrecord(cfg: Any, output_dir: str, log) -> None:
    ar_dir = _get(cfg.output, "arrayrecord_dir", "")
    if ar_dir:
        from mobileclip2_jax.data.tfds_builder import convert_webdataset_to_arrayrecord
        path = convert_webdataset_to_arrayrecord(output_dir, ar_dir)
        log(f"[reinforce] ArrayRecord copy: {path}")


def _check_run_settings(cfg: Any, output_dir: str) -> None:
    """Settings checked before anything loads (teachers can take minutes)."""
    r = cfg.get("run", {})
    for key in ("replay_threads", "chunk_records"):
        if int(_get(r, key, 1)) < 1:
            raise ValueError(f"config.run.{key} must be ≥ 1; got {_get(r, key)}")
    f = float(_get(r, "max_bad_fraction", 0.5))
    if not 0.0 < f <= 1.0:
        raise ValueError(f"config.run.max_bad_fraction must be in (0, 1]; got {f}")
    for key, path in (("output_dir", output_dir), ("output.arrayrecord_dir", _get(cfg.output, "arrayrecord_dir", ""))):
        if path and os.path.exists(path) and not os.path.isdir(path):
            raise ValueError(f"config.{key}={path} exists and is not a directory")
    syn = [c for c in cfg.get("synthetic", []) if _get(c, "kind", "other_captions") != "none"]
    keys = [_get(c, "key", "syn_text") for c in syn]
    if len(set(keys)) != len(keys):
        raise ValueError(f"config.synthetic: keys must be unique; got {keys}")
    if _get(cfg, "mode", "generate") == "generate" and len(keys) > 1 and \
            _get(cfg.output, "text_emb_layout", "dfndr") == "datacompdr":
        raise ValueError(f"config.output.text_emb_layout='datacompdr' holds one synthetic key after the "
                         f"GT rows; config.synthetic has {keys}: use 'dfndr'")


def run(cfg: Any, *, process_index: int = 0, process_count: int = 1,
        barrier: Optional[Callable[[str], None]] = None, log=None) -> Dict[str, Any]:
    """Runs the job on this process; with ``barrier`` (multi-host) process 0 finalizes after all."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    output_dir = _get(cfg, "output_dir", "")
    if not output_dir:
        raise ValueError("config.output_dir is required (--config.output_dir=DIR)")
    r = cfg.get("run", {})
    _check_run_settings(cfg, output_dir)
    common = dict(process_index=process_index, process_count=process_count,
                  replay_threads=int(_get(r, "replay_threads", 4)),
                  progress_every=float(_get(r, "progress_every_s", 10.0)))
    mode = _get(cfg, "mode", "generate")
    if mode not in ("generate", "add_teacher"):
        raise ValueError(f"config.mode must be 'generate' or 'add_teacher'; got {mode!r}")
    if mode == "generate":  # cheap input checks first: a typo must not wait for teacher loading
        source, desc = build_source(cfg.source)
        captions, spec = build_captions(cfg.get("synthetic", [])), build_spec(cfg)
    teachers = [build_teacher(t, i) for i, t in enumerate(cfg.teachers)]
    if mode == "add_teacher":
        from mobileclip2_jax.data.reinforce_add import TeacherAdder
        if len(teachers) != 1:
            raise ValueError(f"mode 'add_teacher' adds exactly one teacher; config.teachers has {len(teachers)}")
        if not _get(cfg, "input_dir", ""):
            raise ValueError("mode 'add_teacher' needs config.input_dir (the existing dataset)")
        job = TeacherAdder(cfg.input_dir, teachers[0], output_dir, image_shards=_get(cfg, "image_shards", "") or None,
                           chunk_records=int(_get(r, "chunk_records", 16)),
                           max_bad_fraction=float(_get(r, "max_bad_fraction", 0.5)), **common)
        summary = job.run()
        shards, metadata, extra = job.shards, job.output_metadata(), {"mode": mode, "input_dir": job.input_dir}
    else:
        job = Generator(source, teachers, captions, spec, output_dir,
                        source_description=desc, max_bad_fraction=float(_get(r, "max_bad_fraction", 0.5)),
                        **common)
        summary = job.run()
        shards = num_shards(len(source), job.spec.samples_per_shard)
        metadata, extra = generation_metadata(job), {"mode": mode, "skipped_at_indexing": desc["skipped_at_indexing"]}
    log(f"[reinforce] process {process_index}: {summary}")
    if barrier is not None:
        barrier("reinforce:shards_done")
    if process_index == 0:
        report = finalize(job.output_dir, shards, metadata, extra_report=extra)
        log(f"[reinforce] {report['num_samples']} samples in {report['num_shards']} shards, "
            f"{report['num_skipped']} skipped {report['skipped_by_kind']}: "
            f"{os.path.join(job.output_dir, 'reinforce_report.json')}")
        _arrayrecord(cfg, job.output_dir, log)
        summary["report"] = {k: report[k] for k in ("num_samples", "num_shards", "num_skipped", "skipped_by_kind")}
    if barrier is not None:
        barrier("reinforce:finalized")
    return summary
