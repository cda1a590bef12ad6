"""Generate a reinforced dataset with arbitrary teachers: the JAX-side RayGen (§4 of the docs).

For every source image: sample ``K`` augmentations (RandomResizedCrop + RandAugment, stored in
DataCompDR's compressed form, drawn from a generator seeded by ``(seed, key)``), replay each one
at every teacher's own resolution and normalization, run the teachers on the views and on the
ground-truth and synthetic captions, and write the record with each teacher's L2-normalized
block concatenated in the recorded order. The public generator never stores the augmentations
(its output cannot be replayed, §4.6); here they are the point.

Orchestration is one task = one output shard, chosen to make failures cheap:

* shard ``s`` holds source items ``[s·N, (s+1)·N)`` and is named ``{s:08d}.tar`` — deterministic,
  so any process can (re)make any shard and a rerun produces identical bytes;
* process ``i`` of ``n`` takes the shards with ``s mod n == i`` (same program on every host);
* a shard is written to a temporary name and renamed when complete, then its per-shard report
  (``_reports/{s:08d}.json``: records, skipped images with the reason, timings) is renamed into
  place. A shard counts as finished only when its report exists, so a run killed at any point
  restarts, redoes at most the shards it was in the middle of, and skips the rest;
* ``reinforce_plan.json`` records everything that determines the output (source, augmentation,
  teachers, captions, layout); a restart with a different configuration is refused instead of
  silently mixing two datasets in one directory;
* :func:`finalize` (process 0, after every shard is finished) merges the reports into
  ``reinforce_report.json``, writes ``manifest.jsonl`` and, last, ``reinforced_metadata.json`` —
  so a directory with metadata is a complete dataset.

Images that cannot be decoded, and items left without synthetic captions, are skipped and listed
in the report with the reason; the run continues (and aborts with a clear error only when more
than ``max_bad_fraction`` of the images are bad, which means the input, not the data, is wrong).
This module never imports a model library: teachers come in as :class:`TeacherModel` objects.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, TextIO, Tuple

import numpy as np

from mobileclip2_jax.data.aug_sampling import AugSamplingConfig, sample_aug_params_list, sample_rng
from mobileclip2_jax.data.augment import Replayer
from mobileclip2_jax.data.records import (BadSample, DatasetMetadata, ReinforcedRecord, SchemaError,
                                          Teacher, decode_image)
from mobileclip2_jax.data.synthetic_captions import SyntheticCaptions
from mobileclip2_jax.data.webdataset import ShardWriter

PLAN_FILENAME = "reinforce_plan.json"
REPORT_FILENAME = "reinforce_report.json"
MANIFEST_FILENAME = "manifest.jsonl"
REPORTS_DIR = "_reports"
SHARD_NAME = "{:08d}.tar"


@dataclasses.dataclass(frozen=True)
class GenerationSpec:
    """Everything besides source, teachers and captions that determines the output bytes."""
    num_augs: int = 5
    augmentation: AugSamplingConfig = AugSamplingConfig()
    seed: int = 0
    samples_per_shard: int = 1000
    gt_captions: str = "first"            # "first": item.captions[0]; "all": every source caption
    text_emb_layout: str = "dfndr"        # or "datacompdr" (GT + one synthetic key in text_emb)
    embedding_format: str = "npz"         # fp32 npz, or bf16 pth.gz as DataCompDR ships
    store_images: bool = True             # False: image-less shards, joined by key at training
    chunk_records: int = 16               # records replayed + embedded together (bounds memory)

    def __post_init__(self):
        for name in ("num_augs", "samples_per_shard", "chunk_records"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"GenerationSpec.{name} must be a positive int; got {v!r}")
        if self.gt_captions not in ("first", "all"):
            raise ValueError(f"gt_captions must be 'first' or 'all'; got {self.gt_captions!r}")
        if self.text_emb_layout not in ("dfndr", "datacompdr"):
            raise ValueError(f"text_emb_layout must be 'dfndr' or 'datacompdr'; got {self.text_emb_layout!r}")
        if self.embedding_format not in ("npz", "pth.gz"):
            raise ValueError(f"embedding_format must be 'npz' or 'pth.gz'; got {self.embedding_format!r}")

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["augmentation"] = self.augmentation.to_dict()
        del d["chunk_records"]  # does not change the output
        return d


# ------------------------------------------------------------------------------ shard plan
def num_shards(num_items: int, samples_per_shard: int) -> int:
    return max(1, -(-num_items // samples_per_shard))


def shards_of_process(n_shards: int, process_index: int, process_count: int) -> List[int]:
    """Shards ``s`` with ``s mod process_count == process_index``."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return list(range(process_index, n_shards, process_count))


def shard_name(shard: "int | str") -> str:
    """``3`` → ``00000003.tar``; a name (add-a-teacher keeps the input's names) passes through."""
    return SHARD_NAME.format(shard) if isinstance(shard, (int, np.integer)) else os.path.basename(shard)


def shard_path(output_dir: str, shard: "int | str") -> str:
    return os.path.join(output_dir, shard_name(shard))


def shard_report_path(output_dir: str, shard: "int | str") -> str:
    name = shard_name(shard)
    return os.path.join(output_dir, REPORTS_DIR, (name[:-4] if name.endswith(".tar") else name) + ".json")


def is_shard_finished(output_dir: str, shard: "int | str") -> bool:
    return os.path.exists(shard_report_path(output_dir, shard)) and os.path.exists(shard_path(output_dir, shard))


def write_json_atomic(path: str, obj: Any) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
    os.replace(tmp, path)


def remove_stale_temporaries(output_dir: str, shards: Sequence["int | str"]) -> None:
    """Deletes ``{s:08d}.tar.tmp-<pid>`` left by a killed run for the shards about to be redone
    (never read: readers take ``*.tar`` only)."""
    prefixes = tuple(shard_name(s) + ".tmp-" for s in shards)
    if not prefixes or not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        if name.startswith(prefixes):
            try:
                os.remove(os.path.join(output_dir, name))
            except FileNotFoundError:
                pass


def _flat(d: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(d, dict):
        out: Dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _shard_reports(output_dir: str) -> Dict[str, Dict[str, Any]]:
    reports = os.path.join(output_dir, REPORTS_DIR)
    out = {}
    for name in sorted(os.listdir(reports)) if os.path.isdir(reports) else []:
        if name.endswith(".json"):
            try:
                with open(os.path.join(reports, name), encoding="utf-8") as f:
                    out[name] = json.load(f)
            except (OSError, ValueError):
                out[name] = {"num_records": 1}  # unreadable: treat as real work, never delete it
    return out


def _discard_empty_run(output_dir: str, reports: Dict[str, Dict[str, Any]]) -> None:
    """A previous plan's shards that hold no record (every image of it was unusable) are removed
    with their reports, so that a corrected configuration starts clean."""
    for name, rep in reports.items():
        for path in (os.path.join(output_dir, REPORTS_DIR, name), os.path.join(output_dir, name[:-5] + ".tar")):
            if os.path.exists(path):
                os.remove(path)


def check_or_write_plan(output_dir: str, plan: Dict[str, Any]) -> None:
    """First run: record the plan. Later runs (restarts, other hosts): it must be identical.

    A directory holding shards or metadata but no plan belongs to something else and is refused
    (nothing in it is overwritten). A plan under which no record was written yet (a first run
    that failed early, or found every image unusable) is replaced, its empty shards removed.
    """
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise FileExistsError(f"output_dir {output_dir} exists and is not a directory")
    path = os.path.join(output_dir, PLAN_FILENAME)
    plan = json.loads(json.dumps(plan, sort_keys=True, default=str))
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        reports = _shard_reports(output_dir) if old != plan else {}
        if old != plan and not any(r.get("num_records", 0) for r in reports.values()):
            _discard_empty_run(output_dir, reports)  # nothing usable was made under the old plan
        elif old != plan:
            a, b = _flat(old), _flat(plan)
            diff = [f"{k}: {a.get(k)!r} → {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            raise SchemaError(f"{path}: {output_dir} was generated with a different configuration "
                              f"({'; '.join(diff[:6])}{' …' if len(diff) > 6 else ''}). Use a new "
                              f"output directory, or restore the original configuration to resume.")
        if old == plan:
            return
    else:
        foreign = sorted(n for n in os.listdir(output_dir)
                         if n.endswith(".tar") or n == "reinforced_metadata.json") if os.path.isdir(output_dir) else []
        if foreign:
            raise SchemaError(f"output_dir {output_dir} already holds {foreign[:3]}"
                              f"{' …' if len(foreign) > 3 else ''} but no {PLAN_FILENAME}: it is not a "
                              f"run of this generator; refusing to write into it (use a new directory)")
    write_json_atomic(path, plan)


# ---------------------------------------------------------------------------- embedding
@dataclasses.dataclass
class PendingRecord:
    """A record whose image is decoded and whose views and captions await the teachers."""
    key: str
    image: Any                      # RGB PIL image as the teachers see it
    param_aug: List[Any]
    texts: List[str]                # rows of every text embedding, in storage order
    fields: Dict[str, Any]          # everything else the ReinforcedRecord needs


def embed_records(pending: Sequence[PendingRecord], teachers: Sequence[Any],
                  interpolation: str, pool: Optional[concurrent.futures.Executor] = None
                  ) -> List[Tuple[np.ndarray, np.ndarray]]:
    """Per record: ``(image_emb [K, ΣD], text_emb [T, ΣD])``, blocks in teacher order.

    Each teacher replays every stored view at its own size/normalization (``Replayer`` with the
    augmentation's crop interpolation), then encodes all views and all texts of the chunk.
    """
    views = [(r, p) for r in pending for p in r.param_aug]
    texts = [t for r in pending for t in r.texts]
    image_blocks, text_blocks = [], []
    replayed: Dict[Any, np.ndarray] = {}  # teachers with equal preprocessing share the views
    for teacher in teachers:
        if teacher.preprocess not in replayed:
            replayer = Replayer(teacher.preprocess, interpolation)
            replay = lambda rp: replayer(rp[0].image, rp[1])[0]  # noqa: E731
            arrays = list(pool.map(replay, views)) if pool is not None else [replay(v) for v in views]
            replayed[teacher.preprocess] = np.stack(arrays)
        image_blocks.append(teacher.encode_images(replayed[teacher.preprocess]))
        text_blocks.append(teacher.encode_texts(texts) if texts else np.zeros((0, teacher.dim), np.float32))
    image_emb, text_emb = np.concatenate(image_blocks, 1), np.concatenate(text_blocks, 1)
    out, iv, it = [], 0, 0
    for r in pending:
        k, t = len(r.param_aug), len(r.texts)
        out.append((image_emb[iv:iv + k], text_emb[it:it + t]))
        iv, it = iv + k, it + t
    return out


class Progress:
    """``[reinforce] … images/s, ETA`` every ``every`` seconds (and at the end)."""

    def __init__(self, total: int, out: Optional[TextIO] = sys.stderr, every: float = 10.0,
                 label: str = "reinforce"):
        self.total, self.out, self.every, self.label = total, out, every, label
        self.done = self.skipped = 0
        self.start = self.last = time.monotonic()

    def update(self, done: int, skipped: int, shard: str, force: bool = False) -> None:
        """``done`` images embedded and ``skipped`` images left out since the last call."""
        self.done += done
        self.skipped += skipped
        now = time.monotonic()
        if self.out is None or self.total == 0 or (not force and now - self.last < self.every):
            return
        self.last = now
        seen = self.done + self.skipped
        rate = seen / max(now - self.start, 1e-9)
        eta = f"{(self.total - seen) / rate:.0f}s" if rate > 0 else "?"
        print(f"[{self.label}] {seen}/{self.total} images  {rate:.2f} images/s  ETA {eta}  "
              f"skipped {self.skipped}  (shard {shard})", file=self.out, flush=True)


# ------------------------------------------------------------------------------ generator
class Generator:
    """Generates this process's shards of a new reinforced dataset (see the module doc)."""

    def __init__(self, source: Any, teachers: Sequence[Any], captions: Sequence[SyntheticCaptions],
                 spec: GenerationSpec, output_dir: str, *, source_description: Optional[Dict[str, Any]] = None,
                 process_index: int = 0, process_count: int = 1, replay_threads: int = 4,
                 max_bad_fraction: float = 0.5, progress: Optional[TextIO] = sys.stderr,
                 progress_every: float = 10.0):
        if not teachers:
            raise ValueError("at least one teacher is needed")
        names = [t.name for t in teachers]
        if len(set(names)) != len(names):
            raise ValueError(f"teacher names must be unique (give them labels); got {names}")
        syn_keys = [c.key for c in captions if c.kind != "none"]
        if len(set(syn_keys)) != len(syn_keys):
            raise ValueError(f"synthetic-caption keys must be unique; got {syn_keys}")
        if spec.text_emb_layout == "datacompdr" and len(syn_keys) > 1:
            raise ValueError(f"text_emb_layout 'datacompdr' stores one synthetic key after the GT rows "
                             f"of text_emb; got keys {syn_keys}: use 'dfndr'")
        if len(source) == 0:
            raise ValueError(f"source {source!r} has no items")
        self.source, self.teachers, self.captions, self.spec = source, list(teachers), list(captions), spec
        self.output_dir = os.path.abspath(output_dir)
        self.process_index, self.process_count = process_index, process_count
        self.replay_threads, self.max_bad_fraction = replay_threads, max_bad_fraction
        self.progress_out, self.progress_every = progress, progress_every
        self.n_shards = num_shards(len(source), spec.samples_per_shard)
        self.source_description = dict(source_description or {"repr": repr(source)})
        self.source_description.update(num_items=len(source), keys_sha256=hashlib.sha256(
            "\n".join(source.keys()).encode("utf-8")).hexdigest())

    # -- plan ---------------------------------------------------------------------------------
    def teacher_entries(self) -> List[Dict[str, Any]]:
        out = []
        for t in self.teachers:
            d = {k: v for k, v in t.describe().items() if k != "device"}
            out.append({"name": t.name, "dim": int(t.dim), "logit_scale": float(t.logit_scale),
                        "source": t.source, **d})
        return out

    def plan(self) -> Dict[str, Any]:
        return {"format": "mobileclip2_jax.reinforce_plan", "version": 1, "spec": self.spec.to_dict(),
                "source": self.source_description, "teachers": self.teacher_entries(),
                "synthetic_captions": [c.describe() for c in self.captions], "num_shards": self.n_shards}

    def my_shards(self) -> List[int]:
        return shards_of_process(self.n_shards, self.process_index, self.process_count)

    # -- per item -----------------------------------------------------------------------------
    def _prepare(self, index: int) -> PendingRecord:
        item = self.source[index]
        image = decode_image(item.image, key=item.key, source=repr(self.source))
        gt = [item.captions[0]] if self.spec.gt_captions == "first" else list(item.captions)
        syn: Dict[str, List[str]] = {}
        for provider in self.captions:
            if provider.kind != "none":
                syn[provider.key] = provider(item, image, len(gt))
        empty = [k for k, v in syn.items() if not v]
        if empty:
            raise BadSample("caption", f"no synthetic captions for key(s) {empty}", key=item.key)
        rng = sample_rng(self.spec.seed, item.key)
        param_aug = sample_aug_params_list(rng, image.width, image.height, self.spec.num_augs,
                                           self.spec.augmentation)
        extra = dict(item.extra)
        extra.update(sha256=hashlib.sha256(item.image).hexdigest(), width=image.width, height=image.height)
        fields = dict(captions=gt, syn_texts=syn, extra=extra,
                      image=bytes(item.image) if self.spec.store_images else None,
                      image_ext=item.image_ext if item.image_ext != "jpeg" else "jpg")
        texts = gt + [c for k in syn for c in syn[k]]
        return PendingRecord(item.key, image, param_aug, texts, fields)

    def _record(self, p: PendingRecord, image_emb: np.ndarray, text_emb: np.ndarray) -> ReinforcedRecord:
        n_gt = len(p.fields["captions"])
        syn_embs: Dict[str, np.ndarray] = {}
        if self.spec.text_emb_layout == "dfndr":
            row = n_gt
            for k, caps in p.fields["syn_texts"].items():
                syn_embs[k], row = text_emb[row:row + len(caps)], row + len(caps)
            text_emb = text_emb[:n_gt]
        return ReinforcedRecord(key=p.key, param_aug=p.param_aug, image_emb=image_emb,
                                text_emb=text_emb, syn_text_embs=syn_embs, **p.fields)

    # -- per shard ----------------------------------------------------------------------------
    def generate_shard(self, shard: int, pool=None, progress: Optional[Progress] = None) -> Dict[str, Any]:
        start = time.monotonic()
        lo = shard * self.spec.samples_per_shard
        indices = range(lo, min(lo + self.spec.samples_per_shard, len(self.source)))
        path = shard_path(self.output_dir, shard)
        skipped: List[Dict[str, Any]] = []
        written = 0
        with ShardWriter(path, embedding_format=self.spec.embedding_format, overwrite=True) as writer:
            chunk: List[PendingRecord] = []

            def flush():
                nonlocal written
                if not chunk:
                    return
                for p, (img_emb, txt_emb) in zip(chunk, embed_records(
                        chunk, self.teachers, self.spec.augmentation.interpolation, pool)):
                    writer.write(self._record(p, img_emb, txt_emb))
                    written += 1
                if progress is not None:
                    progress.update(len(chunk), 0, os.path.basename(path))
                chunk.clear()

            for i in indices:
                try:
                    chunk.append(self._prepare(i))
                except BadSample as e:
                    skipped.append({"index": i, "key": e.key, "kind": e.kind, "reason": e.detail})
                    if progress is not None:
                        progress.update(0, 1, os.path.basename(path))
                if len(chunk) >= self.spec.chunk_records:
                    flush()
            flush()
        report = {"shard": os.path.basename(path), "items": [indices.start, indices.stop],
                  "num_records": written, "skipped": skipped, "seconds": round(time.monotonic() - start, 3),
                  "teachers": [t.name for t in self.teachers]}
        write_json_atomic(shard_report_path(self.output_dir, shard), report)
        return report

    def run(self) -> Dict[str, Any]:
        """Makes every unfinished shard of this process; returns a summary of this run."""
        os.makedirs(self.output_dir, exist_ok=True)
        check_or_write_plan(self.output_dir, self.plan())
        todo = [s for s in self.my_shards() if not is_shard_finished(self.output_dir, s)]
        remove_stale_temporaries(self.output_dir, todo)
        n_skip_done = len(self.my_shards()) - len(todo)
        spe = self.spec.samples_per_shard
        total = sum(min(spe, len(self.source) - s * spe) for s in todo)
        progress = Progress(total, self.progress_out, self.progress_every)
        if self.progress_out is not None:
            print(f"[reinforce] process {self.process_index}/{self.process_count}: {len(todo)} shards to "
                  f"make, {n_skip_done} already finished, {len(self.source)} items in "
                  f"{self.n_shards} shards, teachers {[t.name for t in self.teachers]}",
                  file=self.progress_out, flush=True)
        seen = bad = 0
        with concurrent.futures.ThreadPoolExecutor(self.replay_threads) as pool:
            for s in todo:
                report = self.generate_shard(s, pool if self.replay_threads > 1 else None, progress)
                seen += report["items"][1] - report["items"][0]
                bad += len(report["skipped"])
                if seen >= 50:
                    check_usable_fraction(seen, bad, self.max_bad_fraction, self.output_dir)
        progress.update(0, 0, "all", force=True)
        check_usable_fraction(seen, bad, self.max_bad_fraction, self.output_dir)
        return {"shards_made": len(todo), "shards_already_finished": n_skip_done,
                "images": progress.done, "skipped": progress.skipped,
                "seconds": round(time.monotonic() - progress.start, 3)}


def check_usable_fraction(seen: int, bad: int, max_bad_fraction: float, output_dir: str) -> None:
    """More than ``max_bad_fraction`` unusable images (or none usable) means the input or the
    configuration is wrong — abort, naming where the per-shard reports are, instead of writing
    a "complete" dataset of nothing."""
    if seen and (bad == seen or bad > max_bad_fraction * seen):
        raise SchemaError(f"{bad} of {seen} images could not be used (max_bad_fraction="
                          f"{max_bad_fraction}); reasons per image in {os.path.join(output_dir, REPORTS_DIR)}"
                          f" — is the source (or the synthetic-caption source) right?")


# ------------------------------------------------------------------------------- finalize
def finalize(output_dir: str, shards: "int | Sequence[str]", metadata: DatasetMetadata, *,
             extra_report: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Merges the shard reports, writes the manifest and then the metadata (process 0 only)."""
    shards = list(range(shards)) if isinstance(shards, int) else list(shards)
    n_shards = len(shards)
    missing = [s for s in shards if not is_shard_finished(output_dir, s)]
    if missing:
        raise SchemaError(f"{output_dir}: {len(missing)} of {n_shards} shards are not finished "
                          f"(e.g. {[shard_name(s) for s in missing[:5]]}); rerun the generator "
                          f"(on every host) to finish them before finalizing")
    reports = []
    for s in shards:
        with open(shard_report_path(output_dir, s), encoding="utf-8") as f:
            reports.append(json.load(f))
    skipped = [dict(r, shard=rep["shard"]) for rep in reports for r in rep["skipped"]]
    by_kind: Dict[str, int] = {}
    for r in skipped:
        by_kind[r["kind"]] = by_kind.get(r["kind"], 0) + 1
    n = sum(rep["num_records"] for rep in reports)
    report = {"num_samples": n, "num_shards": n_shards, "num_skipped": len(skipped),
              "skipped_by_kind": dict(sorted(by_kind.items())), "skipped": skipped,
              "shards": [{k: rep[k] for k in ("shard", "num_records", "seconds")} for rep in reports],
              **(extra_report or {})}
    write_json_atomic(os.path.join(output_dir, REPORT_FILENAME), report)
    tmp = os.path.join(output_dir, MANIFEST_FILENAME + f".tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for rep in reports:
            f.write(json.dumps({"shard": rep["shard"][:-len(".tar")], "num_uids": rep["num_records"]}) + "\n")
    os.replace(tmp, os.path.join(output_dir, MANIFEST_FILENAME))
    dataclasses.replace(metadata, num_samples=n).save(output_dir, overwrite=True)
    return report


def generation_metadata(gen: Generator) -> DatasetMetadata:
    """The dataset metadata of a generator's output (teachers in block order)."""
    teachers = tuple(Teacher(t.name, int(t.dim), float(t.logit_scale), t.source) for t in gen.teachers)
    aug = dict(gen.spec.augmentation.to_dict(), num_augs=gen.spec.num_augs, seed=gen.spec.seed)
    return DatasetMetadata(teachers=teachers, text_emb_layout=gen.spec.text_emb_layout,
                           embedding_format=gen.spec.embedding_format, augmentation=aug,
                           source=gen.source_description,
                           extra={"generator": "mobileclip2_jax.data.reinforce",
                                  "teacher_details": gen.teacher_entries(),
                                  "synthetic_captions": [c.describe() for c in gen.captions],
                                  "gt_captions": gen.spec.gt_captions,
                                  "images_stored": gen.spec.store_images})
