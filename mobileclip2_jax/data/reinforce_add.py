"""Add-a-teacher: append one teacher's block to an existing reinforced dataset.

The public generator can only re-sample augmentations (§4.6 item 6), so a new teacher's image
embeddings would belong to views nobody stored. Here the new teacher sees exactly the *stored*
views (``paug.json`` replayed at its resolution) and the stored captions, and its block is
appended after the existing ones:

* every member except the embeddings is copied byte for byte (images, captions, ``syn.json``,
  ``paug.json``, ``json``, ``url.txt``);
* the old embedding columns are copied bit for bit (fp32 ``npz`` as read; bf16 ``pth.gz`` is
  upcast exactly and written back to the same bf16 values);
* the output goes to a *new* directory with the input's shard names, resumable shard by shard
  like :mod:`.reinforce` (process ``i`` takes shards ``i mod n``); the input is never modified;
* the metadata gains the teacher (dims, default logit scale, source) and a history entry.

Text rows follow the stored layout: DFNDR ``text_emb`` = GT captions and one ``<key>_emb`` per
synthetic key; legacy DataCompDR ``text_emb`` = GT rows followed by the captions of the one
synthetic key whose count fills the remaining rows. A record that cannot be read is skipped
and listed in the report (it would otherwise lack the new block).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import os
import sys
import time
from typing import Any, Dict, List, Optional, TextIO

import numpy as np

from mobileclip2_jax.data.records import (BadSample, DatasetMetadata,
                                          ReinforcedRecord, SchemaError, Teacher, decode_image)
from mobileclip2_jax.data.reinforce import (PendingRecord, Progress, check_or_write_plan, check_usable_fraction,
                                            embed_records,
                                            is_shard_finished, remove_stale_temporaries, shard_path,
                                            shard_report_path, shards_of_process, write_json_atomic)
from mobileclip2_jax.data.tar_index import ShardError, read_shard_members
from mobileclip2_jax.data.webdataset import EMBEDDING_FORMATS, ShardWriter, WebDatasetSource, encode_embeddings


def text_rows(rec: ReinforcedRecord) -> List[str]:
    """The captions behind every stored text-embedding row, in storage order."""
    rows = list(rec.captions)
    if rec.text_emb_layout == "dfndr":
        for k in rec.syn_text_embs:
            rows += list(rec.syn_texts[k])
        return rows
    extra = rec.text_emb.shape[0] - len(rec.captions)
    keys = [k for k in sorted(rec.syn_texts) if len(rec.syn_texts[k]) == extra]
    if not keys:
        raise BadSample("emb_shape", f"text_emb has {extra} synthetic rows but no synthetic key has "
                                     f"that many captions ({ {k: len(v) for k, v in rec.syn_texts.items()} })",
                        key=rec.key)
    key = "syn_text" if "syn_text" in keys else keys[0]
    return rows + list(rec.syn_texts[key])


class TeacherAdder:
    """Writes ``input_dir`` + one teacher's block to ``output_dir`` (see the module doc)."""

    def __init__(self, input_dir: str, teacher: Any, output_dir: str, *, image_shards: Optional[str] = None,
                 process_index: int = 0, process_count: int = 1, replay_threads: int = 4,
                 chunk_records: int = 16, interpolation: Optional[str] = None, max_bad_fraction: float = 0.5,
                 progress: Optional[TextIO] = sys.stderr, progress_every: float = 10.0):
        self.input_dir, self.output_dir = os.path.abspath(input_dir), os.path.abspath(output_dir)
        if os.path.realpath(self.input_dir) == os.path.realpath(self.output_dir):
            raise ValueError(f"add-a-teacher writes a new dataset; output_dir must differ from the input "
                             f"{input_dir} (the input is never modified)")
        self.source = WebDatasetSource(self.input_dir, image_shards=image_shards)
        self.metadata: DatasetMetadata = self.source.metadata
        if teacher.name in [t.name for t in self.metadata.teachers]:
            raise ValueError(f"{input_dir} already has a teacher named {teacher.name!r}; give the new "
                             f"one another label")
        self.teacher = teacher
        self.shards = [os.path.basename(p) for p in self.source.shard_paths]
        self.shard_files = dict(zip(self.shards, self.source.shard_paths))
        if len(set(self.shards)) != len(self.shards):
            raise SchemaError(f"{input_dir}: shard base names are not unique; cannot mirror them")
        self.index_of = {k: i for i, k in enumerate(self.source.keys)}
        self.process_index, self.process_count = process_index, process_count
        self.replay_threads, self.chunk_records = replay_threads, chunk_records
        aug = self.metadata.augmentation or {}
        self.interpolation = interpolation or aug.get("random_resized_crop", {}).get("interpolation", "bicubic")
        self.progress_out, self.progress_every = progress, progress_every
        self.max_bad_fraction = max_bad_fraction

    def teacher_entry(self) -> Dict[str, Any]:
        t = self.teacher
        d = {k: v for k, v in t.describe().items() if k != "device"}
        return {"name": t.name, "dim": int(t.dim), "logit_scale": float(t.logit_scale), "source": t.source, **d}

    def plan(self) -> Dict[str, Any]:
        meta_sha = hashlib.sha256(repr(sorted(self.metadata.to_json_dict().items())).encode()).hexdigest()
        return {"format": "mobileclip2_jax.add_teacher_plan", "version": 1, "input_dir": self.input_dir,
                "input_metadata_sha256": meta_sha, "shards": self.shards, "teacher": self.teacher_entry(),
                "interpolation": self.interpolation}

    def output_metadata(self) -> DatasetMetadata:
        t = self.teacher
        extra = dict(self.metadata.extra)
        extra["teacher_details"] = list(extra.get("teacher_details", [])) + [self.teacher_entry()]
        extra["history"] = list(extra.get("history", [])) + [
            {"added_teacher": t.name, "from": self.input_dir, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}]
        return dataclasses.replace(self.metadata, extra=extra, teachers=self.metadata.teachers + (
            Teacher(t.name, int(t.dim), float(t.logit_scale), t.source),))

    def _pending(self, key: str) -> PendingRecord:
        i = self.index_of[key]
        rec = self.source.decode(self.source[i])
        image = decode_image(rec.image, key=key, source=self.source.shard_of(i))
        return PendingRecord(key, image, rec.param_aug, text_rows(rec), {"record": rec})

    def add_to_shard(self, shard: str, pool=None, progress: Optional[Progress] = None) -> Dict[str, Any]:
        start = time.monotonic()
        fmt = self.metadata.embedding_format
        skipped: List[Dict[str, Any]] = []
        written = 0
        with ShardWriter(shard_path(self.output_dir, shard), embedding_format=fmt, overwrite=True) as writer:
            chunk: List[tuple] = []

            def flush():
                nonlocal written
                if not chunk:
                    return
                embs = embed_records([p for _, p in chunk], [self.teacher], self.interpolation, pool)
                for (members, p), (img_new, txt_new) in zip(chunk, embs):
                    writer.write_members(p.key, self._members(members, p.fields["record"], img_new, txt_new))
                    written += 1
                if progress is not None:
                    progress.update(len(chunk), 0, shard)
                chunk.clear()

            try:
                for key, members in read_shard_members(self.shard_files[shard]):
                    try:
                        if key not in self.index_of or "__error_kind__" in members:
                            raise BadSample("truncated", "record not readable (cut or faulty member)", key=key)
                        chunk.append((members, self._pending(key)))
                    except BadSample as e:
                        skipped.append({"key": key, "kind": e.kind, "reason": e.detail})
                        if progress is not None:
                            progress.update(0, 1, shard)
                    if len(chunk) >= self.chunk_records:
                        flush()
            except ShardError as e:  # a cut tar: keep what was read, list the rest as lost
                skipped.append({"key": None, "kind": "truncated", "reason": f"rest of the shard unreadable: {e}"})
            flush()
        report = {"shard": shard, "num_records": written, "skipped": skipped,
                  "seconds": round(time.monotonic() - start, 3), "teachers": [self.teacher.name]}
        write_json_atomic(shard_report_path(self.output_dir, shard), report)
        return report

    def _members(self, members: Dict[str, bytes], rec: ReinforcedRecord, img_new: np.ndarray,
                 txt_new: np.ndarray) -> Dict[str, bytes]:
        out = {k: v for k, v in members.items() if k not in EMBEDDING_FORMATS and not k.startswith("__")}
        n_gt = len(rec.captions)
        arrays = {"image_emb": np.concatenate([rec.image_emb, img_new], 1)}
        if rec.text_emb_layout == "dfndr":
            arrays["text_emb"] = np.concatenate([rec.text_emb, txt_new[:n_gt]], 1)
            row = n_gt
            for k, old in rec.syn_text_embs.items():
                arrays[f"{k}_emb"] = np.concatenate([old, txt_new[row:row + len(old)]], 1)
                row += len(old)
        else:
            arrays["text_emb"] = np.concatenate([rec.text_emb, txt_new], 1)
        out[self.metadata.embedding_format] = encode_embeddings(arrays, self.metadata.embedding_format)
        return out

    def run(self) -> Dict[str, Any]:
        os.makedirs(self.output_dir, exist_ok=True)
        check_or_write_plan(self.output_dir, self.plan())
        mine = [self.shards[i] for i in shards_of_process(len(self.shards), self.process_index, self.process_count)]
        todo = [s for s in mine if not is_shard_finished(self.output_dir, s)]
        remove_stale_temporaries(self.output_dir, todo)
        todo_files = {self.shard_files[s] for s in todo}
        total = sum(self.source.shard_of(i) in todo_files for i in range(len(self.source)))
        progress = Progress(total, self.progress_out, self.progress_every, label="add-teacher")
        with concurrent.futures.ThreadPoolExecutor(self.replay_threads) as pool:
            for s in todo:
                self.add_to_shard(s, pool if self.replay_threads > 1 else None, progress)
        progress.update(0, 0, "all", force=True)
        check_usable_fraction(progress.done + progress.skipped, progress.skipped, self.max_bad_fraction,
                              self.output_dir)
        return {"shards_made": len(todo), "shards_already_finished": len(mine) - len(todo),
                "images": progress.done, "skipped": progress.skipped,
                "seconds": round(time.monotonic() - progress.start, 3)}
