"""Reinforced datasets as a TFDS ArrayRecord dataset: build, convert from webdataset, read.

Why ArrayRecord through TFDS (``jax_patterns.md`` §5.4): Grain needs random access, and TFDS's
``array_record`` format gives it in a self-describing layout (``dataset_info.json``,
``features.json``, shards) that ``tfds.builder_from_directory``/``tfds.data_source`` read without
our code. With tfds 4.9.10 both building (``download_and_prepare``, tfds's own protobuf example
serializer) and reading (``deserialize_example_np``) run without TensorFlow (tested in a subprocess).

Encoding (features are fixed per dataset, records are not):

* ``image``: the encoded bytes as stored (``has_image`` tells ``None`` from ``b""``). Not
  ``tfds.features.Image``: that would decode/re-encode at build time and decode at read time; we
  decode later with PIL (:func:`records.decode_image`) so a corrupt image is a counted
  :class:`BadSample` of the pipeline, not a build failure, and storage stays small.
* ``captions``: ``Sequence(Text)``; synthetic captions, augmentation params, ``extra`` and ``url``
  as JSON strings (their nesting varies per record and JSON round-trips Python floats exactly).
* ``image_emb``/``text_emb``: float32 ``[rows, D]`` (``D`` from :class:`DatasetMetadata`);
  ``syn_text_emb`` holds the rows of every ``<syn_key>_emb`` (DFNDR layout) concatenated, and
  ``syn_text_emb_index_json`` = ``[[syn_key, n_rows], ...]`` says which rows belong to which
  key (empty in the DataCompDR layout, where ``text_emb`` = [GT..., syn...]).

:class:`DatasetMetadata` is stored twice with the dataset: ``reinforced_metadata.json`` in the
prepared directory (what every other reader in this project looks for) and in TFDS's
``metadata.json`` (so a copy of the TFDS directory alone still carries the teachers); the reader
checks that they agree. Records are written in input order (TFDS shuffling disabled), so index
``i`` here is index ``i`` of the source that was converted, minus the skipped records listed in
``conversion_report.json``. No JAX or torch here: this runs in data-loader worker processes.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import operator
import os
import re
import shutil
import tempfile
import types
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np
import tensorflow_datasets as tfds

from mobileclip2_jax.data.augment import AugParams
from mobileclip2_jax.data.records import (METADATA_FILENAME, BadSample, DatasetMetadata,
                                          ReinforcedRecord, SchemaError)

log = logging.getLogger(__name__)

REPORT_FILENAME = "conversion_report.json"
FORMAT_NAME = "mobileclip2_jax.reinforced_arrayrecord"
ENCODING_VERSION = 1
MAX_LISTED_SKIPS = 100_000  # counts stay exact beyond this; only the listing is cut
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
RecordsArg = Union[Iterable[Union[ReinforcedRecord, BadSample]],
                   Callable[[], Iterable[Union[ReinforcedRecord, BadSample]]]]


class DatasetNotFoundError(SchemaError, FileNotFoundError):
    """No prepared reinforced ArrayRecord dataset where one was expected."""


def _json_default(o: Any) -> Any:
    if isinstance(o, AugParams):
        return o.to_stored()
    if isinstance(o, (np.integer, np.floating, np.bool_)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON serializable")


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, default=_json_default)


def features_for(metadata: DatasetMetadata) -> tfds.features.FeaturesDict:
    """The fixed TFDS features of a reinforced dataset whose embeddings are ``D`` wide."""
    d = metadata.embed_dim
    emb = lambda doc: tfds.features.Tensor(shape=(None, d), dtype=np.float32, doc=doc)  # noqa: E731
    text = lambda doc: tfds.features.Text(doc=doc)  # noqa: E731
    return tfds.features.FeaturesDict({
        "key": text("sample key (uid)"),
        "image": tfds.features.Tensor(shape=(), dtype=np.object_,
                                      doc="encoded image bytes as stored (decoded by the pipeline)"),
        "has_image": tfds.features.Tensor(shape=(), dtype=np.bool_, doc="False: image-less record"),
        "image_ext": text("jpg/jpeg/png/webp"),
        "captions": tfds.features.Sequence(tfds.features.Text(), doc="ground-truth caption(s)"),
        "syn_texts_json": text('JSON {"<syn_key>": [captions]} (syn.json)'),
        "param_aug_json": text("JSON list of compressed augmentations (paug.json param_aug)"),
        "image_emb": emb("teacher image embeddings [n_aug, D], row a = param_aug[a]"),
        "text_emb": emb("teacher text embeddings: [GT] (DFNDR) or [GT, syn...] (DataCompDR)"),
        "syn_text_emb": emb("rows of every <syn_key>_emb, concatenated in index order"),
        "syn_text_emb_index_json": text("JSON [[syn_key, n_rows], ...] for syn_text_emb"),
        "extra_json": text("JSON object of remaining fields (uid, sha256, ...)"),
        "url_json": text("JSON string or null"),
    })


def encode_example(record: ReinforcedRecord, metadata: DatasetMetadata) -> Dict[str, Any]:
    """A *validated* record → the feature dict :func:`features_for` describes."""
    d = metadata.embed_dim
    keys = list(record.syn_text_embs)
    syn = (np.concatenate([record.syn_text_embs[k] for k in keys], axis=0) if keys
           else np.zeros((0, d), np.float32))
    return {
        "key": record.key,
        "image": b"" if record.image is None else bytes(record.image),
        "has_image": record.image is not None,
        "image_ext": record.image_ext,
        "captions": list(record.captions),
        "syn_texts_json": _dumps(dict(record.syn_texts)),
        "param_aug_json": _dumps(list(record.param_aug)),
        "image_emb": np.ascontiguousarray(record.image_emb, np.float32),
        "text_emb": np.ascontiguousarray(record.text_emb, np.float32),
        "syn_text_emb": np.ascontiguousarray(syn, np.float32),
        "syn_text_emb_index_json": _dumps([[k, int(record.syn_text_embs[k].shape[0])] for k in keys]),
        "extra_json": _dumps(dict(record.extra)),
        "url_json": _dumps(record.url),
    }


# ----------------------------------------------------------------------------------- building
class _Report:
    """What generation kept and skipped; written as ``conversion_report.json``."""

    def __init__(self):
        self.num_input = self.num_written = self.num_skipped = 0
        self.by_kind: Dict[str, int] = {}
        self.skipped: List[Dict[str, Any]] = []

    def skip(self, index: int, kind: str, reason: str, key: Optional[str], source: Optional[str]):
        self.num_skipped += 1
        self.by_kind[kind] = self.by_kind.get(kind, 0) + 1
        if len(self.skipped) < MAX_LISTED_SKIPS:
            self.skipped.append({"index": index, "key": key, "source": source, "kind": kind,
                                 "reason": reason})

    def to_json_dict(self, **extra: Any) -> Dict[str, Any]:
        return {"num_input": self.num_input, "num_written": self.num_written,
                "num_skipped": self.num_skipped, "skipped_by_kind": dict(sorted(self.by_kind.items())),
                "skipped": self.skipped, "skipped_listing_truncated": self.num_skipped > len(self.skipped),
                **extra}


class ReinforcedDatasetBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """TFDS builder of one ``train`` split from an iterable of :class:`ReinforcedRecord`.

    Not registered with TFDS: each dataset gets its own subclass (``name``/``VERSION``) from
    :func:`build_arrayrecord_dataset`, and nothing needs the class to *read* the result.
    Items that are :class:`BadSample` (a producer's decode failure) or that fail
    ``record.validate(metadata)`` are skipped and listed in :attr:`report`, never raised:
    one bad record must not cost a multi-hour conversion.
    """
    name = "reinforced"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Reinforced records (mobileclip2_jax encoding v1)."}
    # tfds derives a checksums-file location from the module's package path; for a package
    # module (not a script) that check touches ``importlib_resources``, which tfds 4.9.10 only
    # requires on Python < 3.9, so it is absent here. We download nothing, so: no code path.
    code_path = None

    def __init__(self, *, records: RecordsArg, metadata: DatasetMetadata, data_dir: str,
                 require_image: bool = True, report_extra: Optional[Mapping[str, Any]] = None,
                 **kwargs: Any):
        self._records, self._reinforced = records, metadata
        self._require_image, self._report_extra = require_image, dict(report_extra or {})
        self.report, self.generation_started = _Report(), False
        super().__init__(data_dir=data_dir, file_format="array_record", **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        m = self._reinforced
        teachers = ", ".join(f"{t.name} ({t.dim})" for t in m.teachers)
        return tfds.core.DatasetInfo(
            builder=self, features=features_for(m), disable_shuffling=True,
            description=f"Reinforced image-text dataset ({m.text_emb_layout} layout); "
                        f"teachers: {teachers}. Encoded by {__name__}.",
            metadata=tfds.core.MetadataDict(format=FORMAT_NAME, encoding_version=ENCODING_VERSION,
                                            reinforced=m.to_json_dict()))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        self.generation_started = True
        records = self._records() if callable(self._records) else self._records
        rep, meta = self.report, self._reinforced
        for index, item in enumerate(records):
            rep.num_input += 1
            try:
                if isinstance(item, BadSample):
                    raise item
                if not isinstance(item, ReinforcedRecord):
                    raise TypeError(f"expected a ReinforcedRecord; got {type(item).__name__}")
                item.validate(meta, require_image=self._require_image)
                example = encode_example(item, meta)
            except BadSample as e:
                rep.skip(index, e.kind, e.detail, e.key, e.source)
                continue
            except Exception as e:  # a producer bug or unserializable field: count, go on
                rep.skip(index, "error", f"{type(e).__name__}: {e}", getattr(item, "key", None), None)
                continue
            rep.num_written += 1
            yield rep.num_written - 1, example  # int keys: TFDS keeps input order
        # DatasetInfo (and so metadata.json) is written after generation: record the count.
        self.info.metadata["reinforced"] = dataclasses.replace(
            meta, num_samples=rep.num_written).to_json_dict()

    def _download_and_prepare(self, dl_manager, download_config):
        if self.generation_started:
            raise RuntimeError("a ReinforcedDatasetBuilder generates once (its record iterable "
                               "may be a one-shot iterator); make a new builder")
        result = super()._download_and_prepare(dl_manager=dl_manager,
                                                download_config=download_config)
        # self.data_dir is still TFDS's temporary directory here, so these files appear
        # atomically with the shards.
        out = os.fspath(self.data_dir)
        dataclasses.replace(self._reinforced, num_samples=self.report.num_written).save(out)
        _write_json(os.path.join(out, REPORT_FILENAME), self.report.to_json_dict(
            dataset=f"{self.name}/{self.VERSION}", split="train", **self._report_extra))
        return result


def _write_json(path: str, obj: Any) -> None:
    tmp = path + f".tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False, default=_json_default)
        f.write("\n")
    os.replace(tmp, path)


def _builder_class(name: str, version: str) -> type:
    if not _NAME_RE.match(name):
        raise ValueError(f"dataset name {name!r} must be snake_case ([a-z][a-z0-9_]*), as TFDS "
                         f"uses it as a directory and a Python identifier")
    try:
        ver = tfds.core.Version(version)
    except ValueError as e:
        raise ValueError(f"version {version!r} must be 'MAJOR.MINOR.PATCH' ({e})") from None
    body = {"name": name, "VERSION": ver, "__module__": __name__,
            "RELEASE_NOTES": {str(ver): ReinforcedDatasetBuilder.RELEASE_NOTES["1.0.0"]}}
    return types.new_class(f"ReinforcedDatasetBuilder_{name}", (ReinforcedDatasetBuilder,),
                           {"skip_registration": True}, lambda ns: ns.update(body))


def _build(records: RecordsArg, metadata: DatasetMetadata, data_dir: str, *, name: str,
           version: str, num_shards: Optional[int], require_image: bool, overwrite: bool,
           report_extra: Optional[Mapping[str, Any]] = None) -> str:
    if not isinstance(metadata, DatasetMetadata):
        raise TypeError(f"metadata must be a DatasetMetadata; got {type(metadata).__name__}")
    if num_shards is not None and (isinstance(num_shards, bool) or num_shards < 1):
        raise ValueError(f"num_shards must be a positive int or None; got {num_shards!r}")
    data_dir = os.path.abspath(os.fspath(data_dir))
    target = os.path.join(data_dir, name, version)
    if os.path.exists(os.path.join(target, "dataset_info.json")) and not overwrite:
        raise FileExistsError(f"{target} already holds a prepared dataset; pass overwrite=True "
                              f"to rebuild it (TFDS would otherwise silently reuse it)")
    builder = _builder_class(name, version)(records=records, metadata=metadata, data_dir=data_dir,
                                            require_image=require_image, report_extra=report_extra)
    mode = (tfds.download.GenerateMode.FORCE_REDOWNLOAD if overwrite
            else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
    downloads = tempfile.mkdtemp(prefix="tfds_downloads_")  # keep data_dir free of downloads/
    try:
        builder.download_and_prepare(download_dir=downloads, download_config=tfds.download.DownloadConfig(
            num_shards=num_shards, try_download_gcs=False, download_mode=mode))
    except Exception as e:
        rep = builder.report
        if not builder.generation_started:
            raise
        if rep.num_input and not rep.num_written:
            first = "; ".join(f"{s['key']}: [{s['kind']}] {s['reason']}" for s in rep.skipped[:3])
            raise SchemaError(f"{target}: none of the {rep.num_input} input records is usable, "
                              f"so nothing was written (first faults: {first})") from e
        if not rep.num_input:
            raise SchemaError(f"{target}: the record iterable yielded nothing") from e
        raise
    finally:
        shutil.rmtree(downloads, ignore_errors=True)
    rep = builder.report
    if rep.num_skipped:
        log.warning("%s: skipped %d of %d records %s; see %s", target, rep.num_skipped,
                    rep.num_input, rep.by_kind, os.path.join(target, REPORT_FILENAME))
    return os.fspath(builder.data_dir)


def build_arrayrecord_dataset(records: RecordsArg, metadata: DatasetMetadata, data_dir: str, *,
                              name: str = "reinforced", version: str = "1.0.0",
                              num_shards: Optional[int] = None, require_image: bool = True,
                              overwrite: bool = False) -> str:
    """Writes ``records`` as ``data_dir/<name>/<version>/`` (TFDS array_record); returns that path.

    ``records``: an iterable (or a callable returning one) of :class:`ReinforcedRecord`; items
    that are :class:`BadSample` or fail ``validate(metadata)`` are skipped and listed in
    ``conversion_report.json`` (see :func:`read_conversion_report`). ``num_shards=None`` lets
    TFDS size the shards (64 MiB–1 GiB). ``require_image=False`` admits image-less records.
    """
    return _build(records, metadata, data_dir, name=name, version=version, num_shards=num_shards,
                  require_image=require_image, overwrite=overwrite,
                  report_extra={"input": {"kind": "records"}})


def convert_webdataset_to_arrayrecord(shards: Union[str, Sequence[str]], data_dir: str, *,
                                      name: str = "reinforced", version: str = "1.0.0",
                                      image_shards: Union[str, Sequence[str], None] = None,
                                      metadata: Optional[DatasetMetadata] = None,
                                      num_shards: Optional[int] = None, require_image: bool = True,
                                      overwrite: bool = False) -> str:
    """Converts reinforced webdataset shards (optionally key-joined with image shards) to ArrayRecord.

    Reads through :class:`~mobileclip2_jax.data.webdataset.WebDatasetSource` (same decoding and
    validation as training from the tars). A record that fails to read, decode or validate is
    skipped, counted and listed with its key and reason in ``conversion_report.json`` next to
    the dataset; conversion never stops for one record. Returns the prepared dataset directory.
    """
    from mobileclip2_jax.data.webdataset import WebDatasetSource  # only the converter needs it

    src = WebDatasetSource(shards, image_shards=image_shards, metadata=metadata,
                           require_image=require_image)

    def items():
        for i in range(len(src)):
            key = src.keys[i]
            try:
                yield src.decode(src[i])
            except BadSample as e:
                yield e.located(key=key)
            except Exception as e:  # unreadable beyond what the reader classifies
                yield BadSample("truncated", f"{type(e).__name__}: {e}", key=key)

    extra = {"input": {"kind": "webdataset", "shards": src.shard_paths,
                       "image_shards": image_shards if image_shards is None or isinstance(
                           image_shards, str) else list(image_shards),
                       "index_faults": src.index_faults,
                       "unmatched_image_keys": int(src.unmatched_image_keys)}}
    return _build(items, src.metadata, data_dir, name=name, version=version, num_shards=num_shards,
                  require_image=require_image, overwrite=overwrite, report_extra=extra)


# ------------------------------------------------------------------------------------ reading
_EXPECTED = ("a TFDS data dir holding <name>/<version>/dataset_info.json, or a prepared dataset "
             "dir holding dataset_info.json and *.array_record-* shards (built by "
             "build_arrayrecord_dataset / convert_webdataset_to_arrayrecord)")


def resolve_dataset_dir(path: str, name: Optional[str] = None) -> str:
    """``path`` itself if it is a prepared dataset, else its only ``<name>/<latest version>``."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise DatasetNotFoundError(f"{path}: no such directory; expected {_EXPECTED}")
    if os.path.isfile(os.path.join(path, "dataset_info.json")):
        return path
    found: Dict[str, List[tfds.core.Version]] = {}
    for n in sorted(os.listdir(path)) if name is None else [name]:
        for v in sorted(os.listdir(os.path.join(path, n))) if os.path.isdir(os.path.join(path, n)) else []:
            if os.path.isfile(os.path.join(path, n, v, "dataset_info.json")) and tfds.core.Version.is_valid(v):
                found.setdefault(n, []).append(tfds.core.Version(v))
    if not found:
        what = "is empty" if not os.listdir(path) else "holds no prepared dataset" + (
            f" named {name!r}" if name else "")
        raise DatasetNotFoundError(f"{path}: {what}; expected {_EXPECTED}")
    if len(found) > 1:
        raise DatasetNotFoundError(f"{path}: holds several datasets {sorted(found)}; pass name= "
                                   f"or the dataset dir itself")
    (n, versions), = found.items()
    return os.path.join(path, n, str(max(versions)))


def read_conversion_report(dataset_dir: str) -> Dict[str, Any]:
    """The ``conversion_report.json`` of a prepared dataset (counts and skipped records)."""
    path = os.path.join(resolve_dataset_dir(dataset_dir), REPORT_FILENAME)
    if not os.path.isfile(path):
        raise DatasetNotFoundError(f"{path}: no conversion report (the dataset was not built here)")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class ArrayRecordSource:
    """Random-access reinforced records from a prepared ArrayRecord dataset, for Grain.

    ``source[i]`` is the example dict from ``tfds.data_source`` (numpy arrays and bytes, so it
    pickles cheaply into a worker's output queue) plus ``__index__`` and ``__source__``; a record
    that cannot be read comes back as ``{"__error__": ...}`` so :meth:`decode` turns it into a
    :class:`BadSample` the pipeline counts, instead of one bad block ending the run.
    The TFDS reader is opened lazily per process and dropped on pickling (open files belong to
    one process), so the source works in Grain worker processes.
    """

    def __init__(self, data_dir_or_dataset_dir: str, *, split: str = "train",
                 require_image: bool = True, name: Optional[str] = None):
        self.dataset_dir = resolve_dataset_dir(data_dir_or_dataset_dir, name)
        self.split, self.require_image = split, require_image
        self._source = None
        builder = self._builder()
        if split not in builder.info.splits:
            raise SchemaError(f"{self.dataset_dir}: no split {split!r}; splits: "
                              f"{sorted(builder.info.splits)}")
        self.metadata = self._load_metadata(builder)
        missing = sorted(set(features_for(self.metadata)) - set(builder.info.features))
        if missing:
            raise SchemaError(f"{self.dataset_dir}: features lack {missing}; not a dataset written "
                              f"by {__name__}")
        width = builder.info.features["image_emb"].shape[-1]
        if width != self.metadata.embed_dim:
            raise SchemaError(f"{self.dataset_dir}: stored embeddings are {width} wide but the "
                              f"metadata's teachers {self.metadata.teacher_dims} sum to "
                              f"{self.metadata.embed_dim}")
        self._len = int(builder.info.splits[split].num_examples)

    def _builder(self):
        try:
            return tfds.builder_from_directory(self.dataset_dir)
        except Exception as e:
            raise SchemaError(f"{self.dataset_dir}: unreadable TFDS dataset info "
                              f"({type(e).__name__}: {e})") from None

    def _load_metadata(self, builder) -> DatasetMetadata:
        stored = (builder.info.metadata or {}).get("reinforced")
        path = os.path.join(self.dataset_dir, METADATA_FILENAME)
        if os.path.isfile(path):
            meta = DatasetMetadata.load(path)
            if stored is not None and DatasetMetadata.from_json_dict(stored) != meta:
                raise SchemaError(f"{path} disagrees with the TFDS metadata.json of the same "
                                  f"dataset; one of them was edited or copied from elsewhere")
            return meta
        if stored is None:
            raise SchemaError(f"{self.dataset_dir}: no {METADATA_FILENAME} and no 'reinforced' "
                              f"entry in metadata.json: the teachers and dims are unknown")
        return DatasetMetadata.from_json_dict(stored, where=f"{self.dataset_dir}/metadata.json")

    def _open(self):
        if self._source is None:
            try:
                self._source = self._builder().as_data_source(self.split)
            except Exception as e:
                raise SchemaError(f"{self.dataset_dir}: cannot open split {self.split!r} "
                                  f"shards ({type(e).__name__}: {e})") from None
        return self._source

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> Dict[str, Any]:
        i = operator.index(index)
        if not -self._len <= i < self._len:
            raise IndexError(f"record {index} out of range for {self._len} records")
        i %= self._len
        where = f"{self.dataset_dir}[{self.split}][{i}]"
        source = self._open()
        try:
            raw = dict(source[i])
        except Exception as e:  # a corrupt chunk or proto: one bad record, not a dead pipeline
            return {"__index__": i, "__source__": where, "__error__": f"{type(e).__name__}: {e}"}
        raw["__index__"], raw["__source__"] = i, where
        return raw

    def decode(self, raw: Mapping[str, Any]) -> ReinforcedRecord:
        """Raw example → validated :class:`ReinforcedRecord`; faults raise :class:`BadSample`."""
        where = raw.get("__source__", self.dataset_dir)
        if "__error__" in raw:
            raise BadSample("truncated", f"unreadable record ({raw['__error__']})", source=where)
        key = None
        try:
            key = _text(raw["key"])
            syn_texts = json.loads(_text(raw["syn_texts_json"]))
            index = json.loads(_text(raw["syn_text_emb_index_json"]))
            syn = np.asarray(raw["syn_text_emb"], np.float32)
            syn_embs, start = {}, 0
            for k, n in index:
                syn_embs[k], start = syn[start:start + n], start + n
            if start != syn.shape[0]:
                raise BadSample("emb_shape", f"syn_text_emb has {syn.shape[0]} rows; its index "
                                             f"{index} names {start}")
            record = ReinforcedRecord(
                key=key, captions=[_text(c) for c in raw["captions"]], syn_texts=syn_texts,
                param_aug=json.loads(_text(raw["param_aug_json"])),
                image_emb=np.asarray(raw["image_emb"], np.float32),
                text_emb=np.asarray(raw["text_emb"], np.float32), syn_text_embs=syn_embs,
                image=bytes(raw["image"]) if bool(raw["has_image"]) else None,
                image_ext=_text(raw["image_ext"]), extra=json.loads(_text(raw["extra_json"])),
                url=json.loads(_text(raw["url_json"])))
        except BadSample as e:
            raise e.located(key=key, source=where) from None
        except KeyError as e:
            raise BadSample("missing_key", f"raw example has no field {e}", key=key,
                            source=where) from None
        except (ValueError, TypeError) as e:  # JSON, UTF-8 and structure faults
            raise BadSample("bad_json", f"{type(e).__name__}: {e}", key=key, source=where) from None
        return record.validate(self.metadata, source=where, require_image=self.require_image)

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state["_source"] = None  # reopened lazily in the unpickling process
        return state

    def __repr__(self) -> str:  # stable: Grain checkpoints compare repr(data_source)
        return f"ArrayRecordSource({self._len} records, split={self.split!r}, from {self.dataset_dir})"


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)
