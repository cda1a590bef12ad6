"""Reinforced webdataset shards (DataCompDR / DFNDR layout): encode, write, index, read, decode.

A sample is the run of consecutive tar members ``<key>.<ext>`` (``training_and_data.md`` §1.1,
§9.1): image (``jpg``/``png``/``webp``), ``txt`` (GT caption), ``syn.json``, ``paug.json``, ``npz``
(fp32) or ``pth.gz`` (bf16) embeddings, ``json`` (uid, sha256), ``url.txt``. :func:`encode_record`
writes them as the reference writer does, so the reference trainer reads our shards and we theirs.

Why not just iterate with :mod:`tarfile`: Grain needs random access, so :class:`WebDatasetSource`
(through :mod:`.tar_index`)
scans the 512-byte headers once (no member data) into compact numpy arrays (one byte span per
record); ``source[i]`` is one positional read, and the source pickles cheaply into workers (files
open lazily per process and thread). Indexing costs ~15 µs a member header (pure Python), i.e.
about 1 s per 10k-record shard. And :mod:`tarfile` quietly ends an archive at a corrupt or
cut-off header: here the record it cut becomes a ``truncated``
:class:`~mobileclip2_jax.data.records.BadSample`, named and counted like any other, and the
readable records of the shard stay usable. Written shards are deterministic (mtime/uid/gid 0,
sorted members, fixed zip/gzip times) and appear atomically, so a crashed writer never leaves a
half shard that a later run would index.

Several GT captions: the reference trainer reads ``txt`` as one caption, so ``txt`` holds the first
(what it would train on) and ``captions.json`` (a JSON list) all of them, only when there are
several; the reader prefers ``captions.json``. No JAX or torch: this runs in data-loader workers.
"""
from __future__ import annotations

import dataclasses
import io
import json
import operator
import os
import tarfile
import zipfile
from typing import Any, Dict, Iterable, List, Mapping, Optional

import numpy as np

from mobileclip2_jax.data.augment import AugParams
from mobileclip2_jax.data.records import (IMAGE_EXTENSIONS, BadSample, DatasetMetadata,
                                          ReinforcedRecord)
from mobileclip2_jax.data.tar_index import (_ERROR, _ERROR_KIND, ShardError, ShardNotFoundError,  # noqa: F401 (re-exported)
                                            Shards, _Reader, _ShardIndex, expand_shards,
                                            read_shard_members, split_member_name)
from mobileclip2_jax.data.torch_pickle import (TorchFileError, UnsafePickleError, dump_pth_gz,
                                               load_pth_gz)

EMBEDDING_FORMATS = ("npz", "pth.gz")


# ------------------------------------------------------------------------------ encoding
def _json_default(o: Any) -> Any:
    if isinstance(o, AugParams):
        return o.to_stored()
    if isinstance(o, (np.generic, np.ndarray)):
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON serializable")


def _dumps(obj: Any) -> bytes:
    # json.dumps defaults (ensure_ascii) as the reference writer; NaN refused: it is not JSON.
    return json.dumps(obj, allow_nan=False, default=_json_default).encode("utf-8")


def _npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """``np.savez_compressed`` bytes with a fixed zip time (numpy stamps the wall clock)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type, info.external_attr = zipfile.ZIP_DEFLATED, 0o600 << 16
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def _check_format(embedding_format: str) -> None:
    if embedding_format not in EMBEDDING_FORMATS:
        raise ValueError(f"embedding_format must be one of {EMBEDDING_FORMATS}; got {embedding_format!r}")


def encode_embeddings(arrays: Mapping[str, np.ndarray], embedding_format: str = "npz") -> bytes:
    """The embeddings member: fp32 ``npz`` or bf16 ``pth.gz`` (what the reference writes)."""
    _check_format(embedding_format)
    arrays = {k: np.asarray(v, np.float32) for k, v in arrays.items()}
    return _npz_bytes(arrays) if embedding_format == "npz" else dump_pth_gz(arrays, bfloat16=True)


def encode_record(record: ReinforcedRecord, *, embedding_format: str = "npz",
                  paug_as_json_string: bool = False) -> Dict[str, bytes]:
    """Tar members (ext → bytes) of one record in the reference writer's format; deterministic.

    ``paug_as_json_string``: ``param_aug`` as a JSON *string* of the list (the HF copy's form).
    Embeddings ``image_emb``, ``text_emb`` and ``<syn_key>_emb`` per ``syn_text_embs`` key (DFNDR
    layout), as fp32 ``npz`` or bf16 ``pth.gz``.
    """
    _check_format(embedding_format)
    out: Dict[str, bytes] = {}
    if record.image is not None:
        if record.image_ext.lower() not in IMAGE_EXTENSIONS:
            raise ValueError(f"{record.key}: image_ext {record.image_ext!r} not in {IMAGE_EXTENSIONS}")
        out[record.image_ext.lower()] = bytes(record.image)
    caps = [record.captions] if isinstance(record.captions, (str, bytes)) else list(record.captions)
    if caps:  # bytes pass through unchanged (lets tests store a non-UTF-8 caption)
        out["txt"] = caps[0] if isinstance(caps[0], bytes) else caps[0].encode("utf-8")
    if len(caps) > 1:
        out["captions.json"] = _dumps(caps)
    out["syn.json"] = _dumps(dict(record.syn_texts))
    paug = [p.to_stored() if isinstance(p, AugParams) else p for p in record.param_aug]
    out["paug.json"] = _dumps({"param_aug": _dumps(paug).decode() if paug_as_json_string else paug})
    arrays = {"image_emb": record.image_emb, "text_emb": record.text_emb,
              **{f"{k}_emb": v for k, v in record.syn_text_embs.items()}}
    out[embedding_format] = encode_embeddings(arrays, embedding_format)
    if record.extra:
        out["json"] = _dumps(record.extra)
    if record.url:
        out["url.txt"] = record.url.encode("utf-8")
    return out


# ------------------------------------------------------------------------------ decoding
def _load_embeddings(m: Mapping[str, bytes], bad) -> Dict[str, np.ndarray]:
    if "npz" in m:  # preferred when both exist, as the reference's preprocess_dr
        try:
            with np.load(io.BytesIO(m["npz"]), allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except Exception as e:  # zipfile/numpy raise many types for corrupt bytes
            raise bad("embeddings", f"npz is not a readable numpy archive ({type(e).__name__}: {e})")
    elif "pth.gz" in m:
        try:
            arrays = load_pth_gz(m["pth.gz"])
        except (UnsafePickleError, TorchFileError) as e:
            raise bad("embeddings", f"pth.gz refused or unreadable: {e}")
        if not isinstance(arrays, Mapping) or not all(isinstance(v, np.ndarray) for v in arrays.values()):
            raise bad("embeddings", "pth.gz must hold a dict of tensors")
    else:
        raise bad("missing_key", f"no embeddings (npz or pth.gz); members: {sorted(m)}")
    return {str(k).replace("embedding", "emb"): v for k, v in arrays.items()}


def _json_member(m: Mapping[str, bytes], ext: str, bad, want: type) -> Any:
    if ext not in m:
        raise bad("missing_key", f"no {ext} member; members: {sorted(m)}")
    try:
        value = json.loads(m[ext].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad("bad_json", f"{ext} is not valid UTF-8 JSON ({e})") from None
    if not isinstance(value, want):
        raise bad("bad_json", f"{ext} must be a JSON {want.__name__}; got {type(value).__name__}")
    return value


def decode_members(key: str, members: Mapping[str, bytes], *, source: Optional[str] = None,
                   require_image: bool = True,
                   metadata: Optional[DatasetMetadata] = None) -> ReinforcedRecord:
    """Members of one sample → validated record (inverse of :func:`encode_record`).

    Every fault raises :class:`BadSample` naming ``source`` and ``key``. ``__*__`` entries
    (``__key__``, ``__source__``) are ignored, except a read fault recorded by the shard readers.
    Images are not decoded here (the pipeline decodes them after sampling).
    """
    def bad(kind: str, msg: str) -> BadSample:
        return BadSample(kind, msg, key=key, source=source)

    if _ERROR_KIND in members:
        raise bad(str(members[_ERROR_KIND]), str(members.get(_ERROR, "read fault")))
    m = {k.lower(): v for k, v in members.items() if not k.startswith("__")}
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in m), None)
    if "captions.json" in m:
        captions = _json_member(m, "captions.json", bad, list)
    elif "txt" in m:
        try:
            captions = [m["txt"].decode("utf-8")]
        except UnicodeDecodeError as e:
            raise bad("caption", f"txt is not UTF-8 ({e})") from None
    elif image_ext is None:
        raise bad("missing_key", "no image and no caption (txt): image-less reinforced shards "
                                 "(DataCompDR) must be joined with their image+caption shards by key")
    else:
        raise bad("missing_key", f"no txt member (ground-truth caption); members: {sorted(m)}")
    syn = _json_member(m, "syn.json", bad, dict)
    param_aug = _json_member(m, "paug.json", bad, dict).get("param_aug")
    if isinstance(param_aug, str):  # the HF copy stores the list as a JSON string
        try:
            param_aug = json.loads(param_aug)
        except json.JSONDecodeError as e:
            raise bad("bad_json", f"paug.json param_aug string is not JSON ({e})") from None
    if not isinstance(param_aug, list):
        raise bad("bad_json", f"paug.json needs a 'param_aug' list; got {type(param_aug).__name__}")
    arrays = _load_embeddings(m, bad)
    for name in ("image_emb", "text_emb"):
        if name not in arrays:
            raise bad("missing_key", f"embeddings have no {name!r}; arrays: {sorted(arrays)}")
    record = ReinforcedRecord(
        key=key, captions=captions, syn_texts=syn, param_aug=param_aug,
        image_emb=arrays["image_emb"], text_emb=arrays["text_emb"],
        syn_text_embs={k[:-4]: v for k, v in arrays.items()
                       if k.endswith("_emb") and k not in ("image_emb", "text_emb")},
        image=m[image_ext] if image_ext else None, image_ext=image_ext or "jpg",
        extra=_json_member(m, "json", bad, dict) if "json" in m else {},
        url=m["url.txt"].decode("utf-8", "replace") if "url.txt" in m else None)
    return record.validate(metadata, source=source, require_image=require_image)


# ------------------------------------------------------------------------------ writing
class ShardWriter:
    """Writes one tar shard, visible at ``path`` only once closed without error.

    As a context manager, an exception in the block removes the temp file and leaves any existing
    ``path`` untouched. Members get mtime 0, uid/gid 0 and sorted extensions: equal input, equal bytes.
    """

    def __init__(self, path: str, *, embedding_format: str = "npz",
                 paug_as_json_string: bool = False, overwrite: bool = False):
        self.path = os.fspath(path)
        _check_format(embedding_format)
        if os.path.exists(self.path) and not overwrite:
            raise FileExistsError(f"shard {self.path} already exists; pass overwrite=True to replace it")
        self.embedding_format, self.paug_as_json_string = embedding_format, paug_as_json_string
        self.overwrite, self.num_records, self._keys = overwrite, 0, set()
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self.tmp_path = f"{self.path}.tmp-{os.getpid()}"
        self._file: Optional[io.BufferedWriter] = open(self.tmp_path, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)

    def write(self, record: ReinforcedRecord, *, validate: bool = True) -> None:
        """Writes one record, by default after validating a copy (no metadata; image optional).

        A generator bug should fail here, not at step 40k of a pod run; ``validate=False`` (or
        :meth:`write_members`) writes faulty records on purpose, e.g. for reader tests.
        """
        if validate:
            record = dataclasses.replace(record).validate(source=self.path, require_image=False)
        self.write_members(record.key, encode_record(record, embedding_format=self.embedding_format,
                                                     paug_as_json_string=self.paug_as_json_string))

    def write_members(self, key: str, members: Mapping[str, bytes]) -> None:
        """Writes raw members (ext → bytes) of one key; ``__*__`` entries (``__key__``…) are skipped."""
        if self._file is None:
            raise ValueError(f"shard writer for {self.path} is closed")
        if _ERROR_KIND in members:
            raise ValueError(f"{key}: refusing to write a record with a read fault: {members.get(_ERROR)}")
        if key in self._keys:
            raise ValueError(f"duplicate key {key!r} in shard {self.path}")
        items = sorted((e, v) for e, v in members.items() if not e.startswith("__"))
        for ext, data in items:  # check all before writing any, so a refused record leaves no trace
            if not ext or key.endswith("/") or split_member_name(f"{key}.{ext}") != (key, ext) or not key:
                raise ValueError(f"member {key + '.' + ext!r} would not read back as key {key!r} + ext "
                                 f"{ext!r} (no '.' in a key's basename; exts are lower-case)")
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise TypeError(f"{key}.{ext}: member data must be bytes; got {type(data).__name__}")
        if not items:
            raise ValueError(f"{key}: no members to write")
        for ext, data in items:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(bytes(data)))
        self._keys.add(key)
        self.num_records += 1

    def close(self) -> None:
        """Finishes the tar, fsyncs it and renames it into place."""
        if self._file is None:
            return
        try:
            self._tar.close()
            self._file.flush()
            os.fsync(self._file.fileno())
            if os.path.exists(self.path) and not self.overwrite:
                raise FileExistsError(f"shard {self.path} appeared while writing; not replaced")
        except BaseException:
            self.abort()
            raise
        self._file.close()
        self._file = None
        os.replace(self.tmp_path, self.path)

    def abort(self) -> None:
        """Discards what was written; ``path`` is not touched."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if os.path.exists(self.tmp_path):
            os.remove(self.tmp_path)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.abort() if exc_type is not None else self.close()


def write_dataset(records: Iterable[ReinforcedRecord], directory: str, metadata: DatasetMetadata, *,
                  records_per_shard: int = 1000, embedding_format: Optional[str] = None,
                  shard_name: str = "{:08d}.tar", overwrite: bool = False,
                  validate: bool = True) -> List[str]:
    """Writes shards of ``records_per_shard`` records, then ``reinforced_metadata.json``.

    The metadata goes last (``num_samples`` and the format filled in), so a directory with metadata
    holds complete shards. Each record is validated on its own (:meth:`ShardWriter.write`), but not
    against the metadata's dims: the pipeline's schema check owns that, dataset-wide.
    """
    if records_per_shard <= 0:
        raise ValueError(f"records_per_shard must be positive; got {records_per_shard}")
    fmt = embedding_format or metadata.embedding_format
    paths: List[str] = []
    writer: Optional[ShardWriter] = None
    n = 0
    try:
        for record in records:
            if writer is None or writer.num_records >= records_per_shard:
                if writer is not None:
                    writer.close()
                paths.append(os.path.join(directory, shard_name.format(len(paths))))
                writer = ShardWriter(paths[-1], embedding_format=fmt, overwrite=overwrite)
            writer.write(record, validate=validate)
            n += 1
        if writer is not None:
            writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    dataclasses.replace(metadata, num_samples=n, embedding_format=fmt).save(directory, overwrite=overwrite)
    return paths


class WebDatasetSource:
    """Random-access view over reinforced webdataset shards, for grain.MapDataset.source().

    Records are ordered by (shard order, position in shard). ``image_shards``: image+caption shards
    (DataComp-12M style: ``jpg``, ``txt``, ``json``) joined by key with image-less reinforced ones
    (DataCompDR ships neither images nor captions): members merge per key (reinforced side wins;
    the two ``json`` objects merge), and a key absent from the image side decodes to
    ``BadSample(missing_key)`` instead of vanishing. ``metadata`` defaults to
    ``reinforced_metadata.json`` beside the first shard. Records that indexing found cut or
    corrupt stay in, as ``truncated`` bad samples, and are listed in :attr:`index_faults`.
    """

    def __init__(self, shards: Shards, *, image_shards: Optional[Shards] = None,
                 metadata: Optional[DatasetMetadata] = None, require_image: bool = True):
        self._index = _ShardIndex(expand_shards(shards))
        self.require_image = require_image
        self.metadata = metadata if metadata is not None else DatasetMetadata.load(
            os.path.dirname(os.path.abspath(self._index.paths[0])))
        self._image_index: Optional[_ShardIndex] = None
        self._join: Optional[np.ndarray] = None
        self.unmatched_image_keys = 0  # image-side keys without a reinforced record
        if image_shards is not None:
            self._image_index = _ShardIndex(expand_shards(image_shards))
            where: Dict[str, int] = {}
            for j in range(len(self._image_index)):
                where.setdefault(self._image_index.key(j), j)
            self._join = np.asarray([where.get(self._index.key(i), -1) for i in range(len(self))],
                                    np.int64)
            self.unmatched_image_keys = len(where) - len(set(self._join[self._join >= 0].tolist()))
        self._reader = _Reader()

    @property
    def keys(self) -> List[str]:
        return self._index.keys

    @property
    def shard_paths(self) -> List[str]:
        return list(self._index.paths)

    def shard_of(self, index: int) -> str:
        """Path of the (reinforced-side) shard holding record ``index``."""
        return self._index.shard_of(operator.index(index))

    @property
    def index_faults(self) -> List[str]:
        """``"<shard>:<key>: <fault>"`` for each record found broken while indexing."""
        return [f"{self._index.shard_of(i)}:{self._index.key(i)}: {msg}"
                for i, (_, msg) in sorted(self._index.faults.items())]

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        i, n = operator.index(index), len(self)
        if not -n <= i < n:
            raise IndexError(f"record {index} out of range for {n} records")
        i %= n
        members = self._index.read(i, self._reader)
        if self._join is not None:
            j, side_index = int(self._join[i]), self._image_index
            if j < 0:
                members.setdefault(_ERROR_KIND, "missing_key")
                members.setdefault(_ERROR, f"key not in the image shards ({len(side_index.paths)} shards "
                                           f"from {side_index.paths[0]}): no image or caption to join")
            else:
                side, side_shard = side_index.read(j, self._reader), side_index.shard_of(j)
                if _ERROR_KIND in side and _ERROR_KIND not in members:
                    members[_ERROR_KIND] = side[_ERROR_KIND]
                    members[_ERROR] = f"image side {side_shard}: {side[_ERROR]}"
                if "json" in side and "json" in members:
                    members["json"] = _merge_json(side["json"], members["json"])
                members = {**side, **members, "__image_source__": side_shard}
        return {"__key__": self._index.key(i), "__source__": self._index.shard_of(i), **members}

    def decode(self, raw: Mapping[str, Any]) -> ReinforcedRecord:
        return decode_members(raw["__key__"], raw, source=raw["__source__"], metadata=self.metadata,
                              require_image=self.require_image)

    def __getstate__(self) -> Dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_reader"}  # fds belong to one process

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state, _reader=_Reader())

    def __repr__(self) -> str:
        return (f"WebDatasetSource({len(self)} records in {len(self._index.paths)} shards from "
                f"{os.path.dirname(self._index.paths[0]) or '.'})")


def _merge_json(image_side: bytes, reinforced: bytes) -> bytes:
    """The two ``json`` objects merged (reinforced fields win); anything unparsable: reinforced."""
    try:
        a, b = json.loads(image_side), json.loads(reinforced)
    except (ValueError, UnicodeDecodeError):
        return reinforced
    return _dumps({**a, **b}) if isinstance(a, dict) and isinstance(b, dict) else reinforced
