"""The reinforced-data input pipeline (Grain): records → replayed views, tokens, teacher embeddings.

Per host::

    source (webdataset shards | TFDS ArrayRecord)            random access, raw bytes only
      → (record index, epoch) stream: one global permutation per epoch (seeded), repeated
      → this host's slice  [process_index :: process_count]
      → decode → validate → sample (aug, GT caption, synthetic caption) → replay → tokenize
                                                              (in Grain worker processes)
      → skip bad samples (counted, logged with shard and key)  (main process)
      → batch to the per-host batch                            (main process)

and :mod:`mobileclip2_jax.data.global_batch` turns each host batch into one global ``jax.Array``
sharded on the batch axis.

Why this shape:

* **One permutation, sliced by host** (not one dataset shard per host): every host reads a
  disjoint ``1/process_count`` of each epoch, and the stream of a host is a pure function of
  ``(seed, process_index, process_count, position)``, so a restored iterator state reproduces it.
* **Per-example choices keyed by (seed, record index, epoch)** (:mod:`.sampling`), not by a
  worker's RNG: the augmentation and captions picked for a record do not depend on the number
  of workers or on where a resumed run restarted.
* **Bad samples are markers, dropped after the workers**: a worker never raises on a corrupt
  JPEG; it returns a small marker that the main process counts, logs and drops. Doing the
  many-to-one filter *after* ``mp_prefetch`` keeps the output identical for any worker count
  (Grain slices the map stage round-robin over workers), and keeps the counters in the
  iterator state, so they survive a checkpoint. When more than ``max_bad_fraction`` of the
  first samples are bad the pipeline stops with an error: that is a dataset (or code) problem
  that skipping would only hide.
* **No JAX in this module**: it is imported by every worker process.

The iterator returned by :meth:`ReinforcedPipeline.host_iterator` is a Grain
``DatasetIterator``: ``get_state()``/``set_state()`` give exact resumption, and it can be saved
with Orbax through ``grain.checkpoint.CheckpointSave`` next to the train state.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import math
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Sequence

import grain
import numpy as np

from mobileclip2_jax.data.augment import TRAIN_CROP_INTERPOLATION, Replayer, replay_uint8
from mobileclip2_jax.data.preprocess import PreprocessConfig
from mobileclip2_jax.data.records import (BadSample, DatasetMetadata, SchemaError,
                                          check_records_against_metadata, decode_image)
from mobileclip2_jax.data.sampling import SamplingConfig, sample_record

log = logging.getLogger(__name__)

BAD_MARKER = "__bad_sample__"
# Kinds beyond records.BAD_SAMPLE_KINDS that the pipeline itself can report.
UNEXPECTED_ERROR = "unexpected_error"   # any other exception while processing one record


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Everything that determines the per-host stream (and so belongs to a run's identity).

    ``num_workers`` changes throughput only, never the stream (see the module docstring), but the
    Grain state records it, so a run restores with the same value. ``image_dtype="uint8"`` ships
    the replayed pixels unnormalized (4× less host memory and host→device traffic; normalize on
    device with the student's mean/std); ``"float32"`` is the reference's ``ToTensor`` +
    ``Normalize`` on the host, bit-equal to torchvision.
    """
    global_batch_size: int
    preprocess: PreprocessConfig
    sampling: SamplingConfig = SamplingConfig()
    shuffle: bool = True
    num_epochs: Optional[int] = None          # None: repeat forever
    process_index: int = 0
    process_count: int = 1
    num_workers: int = 0
    per_worker_buffer_size: int = 2
    read_threads: int = 4
    read_buffer_size: int = 64
    image_dtype: str = "float32"
    crop_interpolation: str = TRAIN_CROP_INTERPOLATION
    drop_remainder: bool = True
    max_bad_fraction: float = 0.5             # abort when more than this fraction is bad …
    min_samples_for_bad_check: int = 64       # … once this many samples were seen
    schema_probe_records: int = 8             # records decoded up front for the schema check

    def __post_init__(self):
        if self.global_batch_size < 1:
            raise ValueError(f"global_batch_size must be ≥ 1; got {self.global_batch_size}")
        if not 0 <= self.process_index < self.process_count:
            raise ValueError(f"process_index {self.process_index} not in [0, {self.process_count})")
        if self.global_batch_size % self.process_count:
            raise ValueError(f"global_batch_size {self.global_batch_size} is not divisible by the "
                             f"{self.process_count} processes")
        if self.num_workers < 0 or self.per_worker_buffer_size < 1:
            raise ValueError("num_workers must be ≥ 0 and per_worker_buffer_size ≥ 1")
        if self.image_dtype not in ("float32", "uint8"):
            raise ValueError(f"image_dtype must be 'float32' or 'uint8'; got {self.image_dtype!r}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"num_epochs must be ≥ 1 or None; got {self.num_epochs}")
        if not 0.0 < self.max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in (0, 1]; got {self.max_bad_fraction}")

    @property
    def per_host_batch_size(self) -> int:
        return self.global_batch_size // self.process_count


# ------------------------------------------------------------------------------ worker stage
class ProcessRecord:
    """Record index + epoch → one training example (or a bad-sample marker). Runs in workers.

    Picklable: it holds the source (which reopens its files per process), the tokenizer and
    plain configs. Output per example::

        image         [S, S, 3] float32 (normalized) or uint8
        text          [L] int32   ground-truth caption tokens
        syn_text      [L] int32   synthetic caption tokens      (absent in mix-synthetic mode)
        image_emb     [D] float32 teacher embedding of the chosen view
        text_emb      [D] float32 of the GT caption
        syn_text_emb  [D] float32 of the synthetic caption      (absent in mix-synthetic mode)
        index, epoch, aug_index   int64 / int32 provenance; crop_padded bool
    """

    def __init__(self, source: Any, config: PipelineConfig, tokenizer: Callable[[Sequence[str]], np.ndarray]):
        self.source = source
        self.config = config
        self.tokenizer = tokenizer
        self._replayer: Optional[Replayer] = None

    def _replay(self):
        if self._replayer is None:  # built lazily so workers build their own
            self._replayer = Replayer(self.config.preprocess, self.config.crop_interpolation)
        return self._replayer

    def __call__(self, item: Sequence[int]) -> Dict[str, Any]:
        index, epoch = int(item[0]), int(item[1])
        key = source_name = None
        try:
            raw = self.source[index]
            if isinstance(raw, Mapping):
                key, source_name = raw.get("__key__"), raw.get("__source__")
            record = self.source.decode(raw)
            key = record.key
            try:
                sample = sample_record(record, index, epoch, self.config.sampling)
            except BadSample:
                raise
            except ValueError as e:  # e.g. no synthetic key matches the configured regex
                kind = "missing_key" if "matches" in str(e) or "no " in str(e) else "emb_shape"
                raise BadSample(kind, str(e), key=key, source=source_name) from None
            image = decode_image(record.image, key=key, source=source_name)
            replayer = self._replay()
            if self.config.image_dtype == "uint8":
                pixels, stats = replay_uint8(image, sample.aug_params, self.config.preprocess.image_size,
                                             replayer.interpolation)
            else:
                pixels, stats = replayer(image, sample.aug_params)
        except BadSample as e:
            return _bad(e.located(key=key, source=source_name), index, epoch)
        except Exception as e:  # never let one record kill a pod run; counted and capped instead
            where = ":".join(str(p) for p in (source_name, key) if p is not None) or f"record {index}"
            return {BAD_MARKER: UNEXPECTED_ERROR, "message": f"{where}: {type(e).__name__}: {e}",
                    "index": index, "epoch": epoch}
        texts = [sample.caption] if sample.syn_caption is None else [sample.caption, sample.syn_caption]
        tokens = np.asarray(self.tokenizer(texts), dtype=np.int32)
        out = {"image": pixels, "text": tokens[0], "image_emb": sample.image_emb,
               "text_emb": sample.text_emb, "index": np.int64(index), "epoch": np.int64(epoch),
               "aug_index": np.int32(sample.choice.aug_index),
               "crop_padded": np.bool_(stats.out_of_bounds)}
        if sample.syn_caption is not None:
            out["syn_text"] = tokens[1]
            out["syn_text_emb"] = sample.syn_text_emb
        return out


def _bad(e: BadSample, index: int, epoch: int) -> Dict[str, Any]:
    return {BAD_MARKER: e.kind, "message": str(e), "index": index, "epoch": epoch}


# ------------------------------------------------------------------------ main-process stage
class PipelineStats:
    """Counters of the main-process stage; part of the iterator state."""

    def __init__(self):
        self.examples = 0
        self.crop_padded = 0
        self.bad: collections.Counter = collections.Counter()
        self.last_bad: collections.deque = collections.deque(maxlen=20)

    @property
    def bad_total(self) -> int:
        return sum(self.bad.values())

    def to_state(self) -> Dict[str, Any]:
        return {"examples": self.examples, "crop_padded": self.crop_padded,
                "bad": dict(sorted(self.bad.items())), "last_bad": list(self.last_bad)}

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.examples = int(state["examples"])
        self.crop_padded = int(state["crop_padded"])
        self.bad = collections.Counter({k: int(v) for k, v in state["bad"].items()})
        self.last_bad = collections.deque(state.get("last_bad", []), maxlen=20)

    def summary(self) -> Dict[str, Any]:
        return {"examples": self.examples, "bad_samples": self.bad_total,
                "bad_by_kind": dict(sorted(self.bad.items())), "crops_out_of_image": self.crop_padded}


class _SkipBadSamplesIterDataset(grain.IterDataset):
    """Drops bad-sample markers, counting and logging them (main process, after the workers)."""

    def __init__(self, parent: grain.IterDataset, config: PipelineConfig):
        super().__init__(parent)
        self._config = config

    def __iter__(self) -> "_SkipBadSamplesIterator":
        return _SkipBadSamplesIterator(self._parent.__iter__(), self._config)

    def __str__(self) -> str:
        return "SkipBadSamples"


class _SkipBadSamplesIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, config: PipelineConfig):
        super().__init__(parent)
        self._config = config
        self.stats = PipelineStats()

    def __next__(self) -> Dict[str, Any]:
        while True:
            element = next(self._parent)
            if BAD_MARKER not in element:
                self.stats.examples += 1
                self.stats.crop_padded += int(element["crop_padded"])
                return element
            kind, message = element[BAD_MARKER], element["message"]
            self.stats.bad[kind] += 1
            self.stats.last_bad.append(message)
            log.warning("skipping bad sample (%s): %s", kind, message)
            self._check_bad_fraction()

    def _check_bad_fraction(self) -> None:
        seen = self.stats.examples + self.stats.bad_total
        if seen >= self._config.min_samples_for_bad_check and \
                self.stats.bad_total > self._config.max_bad_fraction * seen:
            raise SchemaError(
                f"{self.stats.bad_total} of the {seen} samples read so far are bad "
                f"({dict(self.stats.bad)}; e.g. {self.stats.last_bad[-1]}); more than "
                f"max_bad_fraction={self._config.max_bad_fraction}: the dataset or its metadata is "
                f"wrong. Run launch/inspect_data.py on it.")

    def get_state(self) -> Dict[str, Any]:
        return {"parent": self._parent.get_state(), "stats": self.stats.to_state()}

    def set_state(self, state: Dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self.stats.load_state(state["stats"])

    def __str__(self) -> str:
        return "SkipBadSamplesIterator"


def _find_stats(iterator: grain.DatasetIterator) -> Optional[PipelineStats]:
    todo = [iterator]
    while todo:
        it = todo.pop()
        if isinstance(it, _SkipBadSamplesIterator):
            return it.stats
        todo.extend(getattr(it, "_parents", ()))
    return None


# ---------------------------------------------------------------------------- the pipeline
def _index_epoch(n: int) -> Callable[[int, int], np.ndarray]:
    def fn(position: int, record_index: int) -> np.ndarray:
        return np.asarray([record_index, position // n], np.int64)
    return fn


class ReinforcedPipeline:
    """Builds the per-host Grain pipeline over one reinforced source.

    ``source``: a random-access reinforced source (``__len__``, ``__getitem__`` → raw record,
    ``decode(raw)`` → :class:`~mobileclip2_jax.data.records.ReinforcedRecord`, ``metadata``),
    e.g. :class:`~mobileclip2_jax.data.webdataset.WebDatasetSource` or
    :class:`~mobileclip2_jax.data.tfds_builder.ArrayRecordSource`; see :func:`open_source`.
    ``tokenizer``: ``texts → (N, L) int32`` (e.g. ``ClipBpeTokenizer``), picklable.

    Construction runs the dataset-wide schema check (metadata present; the first records agree
    with the teachers' dims), so a wrong dataset fails here, before any device work.
    """

    def __init__(self, source: Any, config: PipelineConfig,
                 tokenizer: Callable[[Sequence[str]], np.ndarray]):
        self.source, self.config, self.tokenizer = source, config, tokenizer
        self.num_records = len(source)
        if self.num_records == 0:
            raise SchemaError(f"{source!r}: the dataset has no records")
        metadata = getattr(source, "metadata", None)
        if not isinstance(metadata, DatasetMetadata):
            raise SchemaError(f"{source!r}: no DatasetMetadata (teachers and their dims); "
                              f"training cannot split the teacher embeddings")
        self.metadata: DatasetMetadata = metadata
        self._check_schema()

    def _check_schema(self) -> None:
        probe, faults = [], []
        for i in range(min(self.config.schema_probe_records, self.num_records)):
            try:
                probe.append(self.source.decode(self.source[i]))
            except BadSample as e:
                faults.append(e)
        if not probe:
            raise SchemaError(f"{self.source!r}: none of the first {len(faults)} records is "
                              f"readable; first error: {faults[0]}")
        check_records_against_metadata(probe, self.metadata, where=repr(self.source))

    def dataset(self) -> grain.IterDataset:
        cfg, n = self.config, self.num_records
        ds = grain.MapDataset.range(n)
        if cfg.shuffle:
            ds = ds.shuffle(seed=cfg.sampling.seed)  # a fresh permutation every epoch
        ds = ds.repeat(cfg.num_epochs)
        ds = ds.map_with_index(_index_epoch(n))      # position in the *global* stream → epoch
        ds = ds[cfg.process_index::cfg.process_count]
        ds = ds.map(ProcessRecord(self.source, cfg, self.tokenizer))
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads,
                                                  prefetch_buffer_size=cfg.read_buffer_size))
        if cfg.num_workers > 0:
            it = it.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=cfg.num_workers, per_worker_buffer_size=cfg.per_worker_buffer_size))
        it = _SkipBadSamplesIterDataset(it, cfg)
        return it.batch(cfg.per_host_batch_size, drop_remainder=cfg.drop_remainder)

    def host_iterator(self) -> grain.DatasetIterator:
        """A fresh iterator of per-host batches (dicts of numpy arrays); checkpointable."""
        return iter(self.dataset())

    @staticmethod
    def stats(iterator: grain.DatasetIterator) -> PipelineStats:
        """The bad-sample / crop counters of an iterator made by :meth:`host_iterator`."""
        stats = _find_stats(iterator)
        if stats is None:
            raise ValueError("not an iterator of a ReinforcedPipeline")
        return stats

    def steps_per_epoch(self) -> int:
        return self.num_records // self.config.global_batch_size

    def __repr__(self) -> str:
        return (f"ReinforcedPipeline({self.source!r}, global_batch={self.config.global_batch_size}, "
                f"process {self.config.process_index}/{self.config.process_count})")


def open_source(path: str, *, image_shards: Optional[str] = None, require_image: bool = True) -> Any:
    """A reinforced source from a path: a TFDS ArrayRecord dataset dir, or webdataset shards.

    ``path``: a directory holding a prepared TFDS dataset (``dataset_info.json``), a directory of
    ``*.tar`` shards, a shard file, or a brace/glob pattern of shards. ``image_shards``: image+
    caption shards to join by key with image-less reinforced shards (DataCompDR layout).
    """
    import glob
    import os
    from mobileclip2_jax.data import tfds_builder, webdataset
    if os.path.isdir(path) and (glob.glob(os.path.join(path, "dataset_info.json")) or
                                glob.glob(os.path.join(path, "*", "dataset_info.json")) or
                                glob.glob(os.path.join(path, "*", "*", "dataset_info.json"))):
        if image_shards:
            raise ValueError("image_shards joins webdataset shards; an ArrayRecord dataset "
                             "already holds its images")
        return tfds_builder.ArrayRecordSource(path, require_image=require_image)
    return webdataset.WebDatasetSource(path, image_shards=image_shards, require_image=require_image)


def take_batches(iterator: Iterator[Dict[str, np.ndarray]], n: int) -> list:
    """The next ``n`` batches (a small helper for tests, benchmarks and inspection)."""
    return [next(iterator) for _ in range(n)]


def epoch_of_step(step: int, num_records: int, global_batch_size: int) -> float:
    """Fractional epoch reached after ``step`` global batches (for logging)."""
    return step * global_batch_size / max(1, num_records) if num_records else math.nan
