"""The reinforced-record schema: one image with its stored views, captions and teacher embeddings.

A reinforced dataset (DataCompDR, DFNDR; ``training_and_data.md`` §1, §9) stores per image:

* the encoded image bytes (``jpg``/``png``/``webp``; DataCompDR ships them in separate,
  key-joined shards) and its ground-truth caption(s) (``txt``);
* synthetic captions by key (``syn.json``: ``{"syn_text": [...], ...}``);
* ``N_aug`` compressed augmentations ``[[i, j, h, w], [[op, mag], [op, mag]]]`` (``paug.json``;
  ``null`` for a skipped RandAugment) — replayed by :mod:`mobileclip2_jax.data.augment`;
* teacher embeddings: ``image_emb [N_aug, D]`` (row ``a`` = view ``a``), ``text_emb`` for the GT
  caption(s) — in the legacy DataCompDR layout followed by the synthetic rows — and, in the
  DFNDR layout, ``<syn_key>_emb [N_syn, D]`` per synthetic key;
* anything else (``json``: ``uid``, ``sha256``; ``url.txt``).

``D`` is the concatenation of several teachers' L2-normalized embeddings, so the dataset carries
:class:`DatasetMetadata` (teachers in column order, their dims and default logit scales, the
augmentation config, the source) in ``reinforced_metadata.json`` next to the shards. The
reference has no such file (the teacher dims are trainer flags); here the loss, the inspector and
the generator all read it, so a dataset cannot be trained with the wrong block split.

Errors come in two kinds, because a pod run must neither crash on one bad JPEG nor silently train
on a dataset of the wrong shape: :class:`BadSample` (one record: skipped, named and counted by the
pipeline) and :class:`SchemaError` (the dataset as a whole: raised before training starts).
No JAX or torch here: this runs in data-loader worker processes.
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import re
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

METADATA_FILENAME = "reinforced_metadata.json"
METADATA_VERSION = 1
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
TEXT_EMB_LAYOUTS = ("datacompdr", "dfndr")

# Kinds of per-sample faults, as counted by the pipeline and listed by launch/inspect_data.py.
BAD_SAMPLE_KINDS = (
    "image_decode",   # truncated/corrupt/unsupported image bytes
    "image_empty",    # zero-size image, or zero-length bytes
    "missing_key",    # a required member (image, txt, paug.json, embeddings, …) is absent
    "bad_json",       # syn.json / paug.json / json is not valid JSON or has the wrong structure
    "bad_aug",        # a stored augmentation cannot be decoded
    "caption",        # empty or non-UTF-8 caption
    "emb_shape",      # embedding rows do not align with augs/captions
    "emb_dim",        # embedding width ≠ the metadata's teacher dims
    "non_finite",     # NaN/Inf in an embedding
    "embeddings",     # npz / pth.gz unreadable, or a pth.gz pickle naming a refused global
    "truncated",      # the shard is truncated or corrupt inside this record's members
    "duplicate_member",  # a member extension appears twice for one key in a shard
)


class BadSample(ValueError):
    """One record cannot be used. ``kind`` is one of :data:`BAD_SAMPLE_KINDS`.

    The message names the source (shard file) and key, so a log line is enough to find it.
    """

    def __init__(self, kind: str, message: str, *, key: Optional[str] = None,
                 source: Optional[str] = None):
        if kind not in BAD_SAMPLE_KINDS:
            raise ValueError(f"unknown bad-sample kind {kind!r}; known: {BAD_SAMPLE_KINDS}")
        self.kind, self.detail, self.key, self.source = kind, message, key, source
        super().__init__(self._format())

    def _format(self) -> str:
        where = ":".join(str(p) for p in (self.source, self.key) if p is not None)
        return f"{where + ': ' if where else ''}[{self.kind}] {self.detail}"

    def located(self, *, key: Optional[str] = None, source: Optional[str] = None) -> "BadSample":
        """The same fault with its location filled in (keeps what is already known)."""
        return BadSample(self.kind, self.detail, key=self.key or key, source=self.source or source)

    def __reduce__(self):  # picklable across Grain worker processes
        return (_rebuild_bad_sample, (self.kind, self.detail, self.key, self.source))


def _rebuild_bad_sample(kind, detail, key, source):
    return BadSample(kind, detail, key=key, source=source)


class SchemaError(ValueError):
    """The dataset as a whole does not match what training needs (metadata, dims, layout)."""


# ---------------------------------------------------------------------------------- metadata
@dataclasses.dataclass(frozen=True)
class Teacher:
    """One teacher: its name (e.g. ``"ViT-L-14:openai"``), embedding dim and default logit scale."""
    name: str
    dim: int
    logit_scale: float = 100.0
    source: str = ""  # where the weights came from (a checkpoint path, an open_clip tag, …)

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise SchemaError(f"teacher name must be a non-empty string; got {self.name!r}")
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim <= 0:
            raise SchemaError(f"teacher {self.name!r}: dim must be a positive int; got {self.dim!r}")
        if not (isinstance(self.logit_scale, (int, float)) and math.isfinite(self.logit_scale)
                and self.logit_scale > 0):
            raise SchemaError(f"teacher {self.name!r}: logit_scale must be a positive finite "
                              f"number; got {self.logit_scale!r}")


@dataclasses.dataclass(frozen=True)
class DatasetMetadata:
    """Dataset-level facts that every record shares (``reinforced_metadata.json``).

    ``text_emb_layout``: ``"datacompdr"`` (GT and synthetic rows together in ``text_emb``) or
    ``"dfndr"`` (``text_emb`` = GT rows; ``<syn_key>_emb`` per key). ``embedding_format`` is the
    shard member the embeddings are stored in (``"npz"`` fp32 or ``"pth.gz"`` bf16).
    """
    teachers: Tuple[Teacher, ...]
    text_emb_layout: str = "datacompdr"
    embedding_format: str = "npz"
    augmentation: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    source: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    num_samples: Optional[int] = None
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        teachers = tuple(self.teachers)
        if not teachers:
            raise SchemaError("metadata names no teacher; the embeddings cannot be split")
        if not all(isinstance(t, Teacher) for t in teachers):
            raise SchemaError("metadata.teachers must be Teacher objects")
        names = [t.name for t in teachers]
        if len(set(names)) != len(names):
            raise SchemaError(f"teacher names must be unique; got {names}")
        object.__setattr__(self, "teachers", teachers)
        if self.text_emb_layout not in TEXT_EMB_LAYOUTS:
            raise SchemaError(f"text_emb_layout must be one of {TEXT_EMB_LAYOUTS}; "
                              f"got {self.text_emb_layout!r}")
        if self.embedding_format not in ("npz", "pth.gz"):
            raise SchemaError(f"embedding_format must be 'npz' or 'pth.gz'; "
                              f"got {self.embedding_format!r}")

    @property
    def embed_dim(self) -> int:
        """Width ``D`` of the stored (concatenated) embeddings."""
        return sum(t.dim for t in self.teachers)

    @property
    def teacher_dims(self) -> Tuple[int, ...]:
        return tuple(t.dim for t in self.teachers)

    @property
    def logit_scales(self) -> Tuple[float, ...]:
        return tuple(float(t.logit_scale) for t in self.teachers)

    def blocks(self) -> List[Tuple[int, int]]:
        """``[start, end)`` column range of each teacher, in order."""
        out, start = [], 0
        for t in self.teachers:
            out.append((start, start + t.dim))
            start += t.dim
        return out

    def to_json_dict(self) -> Dict[str, Any]:
        return {"format": "mobileclip2_jax.reinforced", "version": METADATA_VERSION,
                "teachers": [dataclasses.asdict(t) for t in self.teachers],
                "embed_dim": self.embed_dim, "text_emb_layout": self.text_emb_layout,
                "embedding_format": self.embedding_format,
                "augmentation": dict(self.augmentation), "source": dict(self.source),
                "num_samples": self.num_samples, "extra": dict(self.extra)}

    @classmethod
    def from_json_dict(cls, d: Mapping[str, Any], *, where: str = "metadata") -> "DatasetMetadata":
        if not isinstance(d, Mapping):
            raise SchemaError(f"{where}: expected a JSON object, got {type(d).__name__}")
        version = d.get("version", METADATA_VERSION)
        if version != METADATA_VERSION:
            raise SchemaError(f"{where}: metadata version {version!r} is not supported "
                              f"(this code reads version {METADATA_VERSION})")
        raw = d.get("teachers")
        if not isinstance(raw, list) or not raw:
            raise SchemaError(f"{where}: 'teachers' must be a non-empty list of "
                              f"{{name, dim, logit_scale}} objects; got {raw!r}")
        teachers = []
        for i, t in enumerate(raw):
            if not isinstance(t, Mapping) or "name" not in t or "dim" not in t:
                raise SchemaError(f"{where}: teachers[{i}] must have 'name' and 'dim'; got {t!r}")
            try:
                teachers.append(Teacher(name=t["name"], dim=t["dim"],
                                        logit_scale=t.get("logit_scale", 100.0),
                                        source=t.get("source", "")))
            except SchemaError as e:
                raise SchemaError(f"{where}: teachers[{i}]: {e}") from None
        try:
            meta = cls(teachers=tuple(teachers),
                       text_emb_layout=d.get("text_emb_layout", "datacompdr"),
                       embedding_format=d.get("embedding_format", "npz"),
                       augmentation=d.get("augmentation") or {}, source=d.get("source") or {},
                       num_samples=d.get("num_samples"), extra=d.get("extra") or {})
        except SchemaError as e:
            raise SchemaError(f"{where}: {e}") from None
        if "embed_dim" in d and d["embed_dim"] != meta.embed_dim:
            raise SchemaError(f"{where}: embed_dim {d['embed_dim']} ≠ sum of teacher dims "
                              f"{meta.teacher_dims} = {meta.embed_dim}")
        return meta

    def save(self, directory: str, *, overwrite: bool = False) -> str:
        """Writes ``directory/reinforced_metadata.json`` atomically (temp file + rename)."""
        path = os.path.join(directory, METADATA_FILENAME)
        if os.path.exists(path) and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
        os.makedirs(directory, exist_ok=True)
        tmp = path + f".tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_json_dict(), f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str) -> "DatasetMetadata":
        """Reads ``path`` (the JSON file, or a directory holding it)."""
        if os.path.isdir(path):
            path = os.path.join(path, METADATA_FILENAME)
        if not os.path.exists(path):
            raise SchemaError(f"{path}: no dataset metadata (expected {METADATA_FILENAME} naming "
                              f"the teachers and their dims next to the shards)")
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SchemaError(f"{path}: not valid JSON ({e})") from None
        return cls.from_json_dict(d, where=path)


# ------------------------------------------------------------------------------------ images
def decode_image(data: bytes, *, key: Optional[str] = None,
                 source: Optional[str] = None) -> Image.Image:
    """Encoded bytes → fully decoded RGB PIL image, as the reference trainer decodes.

    The reference decodes with webdataset's ``pilrgba`` and then ``convert('RGB')`` (and the
    generator does ``convert('RGBA').convert('RGB')``), so every mode — grayscale, palette, CMYK,
    16-bit, with or without alpha — goes through RGBA, and alpha is dropped without compositing.
    Doing exactly that keeps the student's pixels equal to what the teacher saw.
    Truncated or corrupt data raises :class:`BadSample` (``image_decode``) instead of PIL's
    silent grey fill; zero-size images raise ``image_empty``.
    """
    if not data:
        raise BadSample("image_empty", "image bytes are empty", key=key, source=source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, … for bad bytes
        msg = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "the image bytes", str(e))
        raise BadSample("image_decode", f"cannot decode image ({type(e).__name__}: {msg})",
                        key=key, source=source) from None
    if img.width == 0 or img.height == 0:
        raise BadSample("image_empty", f"image has size {img.size}", key=key, source=source)
    if img.mode == "RGB":  # RGB → RGBA → RGB is the identity (alpha 255 added, then dropped)
        return img
    try:
        return img.convert("RGBA").convert("RGB")
    except Exception as e:
        raise BadSample("image_decode", f"cannot convert mode {img.mode!r} to RGB ({e})",
                        key=key, source=source) from None


# ----------------------------------------------------------------------------------- records
_N_OPS = 14  # len(augment.OP_NAMES); the full parser below checks the same range


def _plain_aug(p: Any) -> bool:
    """True when ``p`` is a well-formed stored augmentation in its usual JSON types.

    Validation runs on every visit of every record (30 augmentations each in DataCompDR-12M), so
    the plain ``[[i, j, h, w], [[op, mag], …] | null]`` case is checked here with type tests only;
    anything else (JSON strings, numpy scalars, errors) goes to ``decode_aug_params``, which
    accepts the same set and words the error.
    """
    if type(p) is not list or len(p) != 2 or type(p[0]) is not list or len(p[0]) != 4:
        return False
    box, ops = p
    if not all(type(v) is int for v in box) or box[2] <= 0 or box[3] <= 0:
        return False
    if ops is None:
        return True
    if type(ops) is not list:
        return False
    for op in ops:
        if type(op) is not list or len(op) != 2 or type(op[0]) is not int or \
                not 0 <= op[0] < _N_OPS or type(op[1]) not in (int, float) or \
                not math.isfinite(op[1]):
            return False
    return True


def _as_emb(x: Any, what: str, key: Optional[str]) -> np.ndarray:
    try:
        arr = np.asarray(x, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise BadSample("emb_shape", f"{what} is not numeric ({e})", key=key) from None
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2:
        raise BadSample("emb_shape", f"{what} must be [rows, D]; got shape {arr.shape}", key=key)
    return arr


@dataclasses.dataclass
class ReinforcedRecord:
    """One decoded reinforced sample (embeddings as float32; bf16 storage is upcast exactly).

    ``syn_text_embs`` maps a synthetic key (``"syn_text"``, not ``"syn_text_emb"``) to its
    ``[N_syn, D]`` rows; it is empty in the legacy DataCompDR layout. ``image`` may be ``None``
    for image-less (embedding-only) shards before they are joined with image shards.
    """
    key: str
    captions: List[str]
    syn_texts: Dict[str, List[str]]
    param_aug: List[Any]
    image_emb: np.ndarray
    text_emb: np.ndarray
    syn_text_embs: Dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    image: Optional[bytes] = None
    image_ext: str = "jpg"
    extra: Dict[str, Any] = dataclasses.field(default_factory=dict)
    url: Optional[str] = None

    @property
    def n_aug(self) -> int:
        return len(self.param_aug)

    @property
    def embed_dim(self) -> int:
        return int(np.shape(self.image_emb)[-1])

    @property
    def text_emb_layout(self) -> str:
        """``"datacompdr"`` when ``text_emb`` holds more rows than GT captions, else ``"dfndr"``."""
        return "datacompdr" if np.shape(self.text_emb)[0] > len(self.captions) else "dfndr"

    def validate(self, metadata: Optional[DatasetMetadata] = None, *,
                 source: Optional[str] = None, require_image: bool = True) -> "ReinforcedRecord":
        """Checks everything training relies on; raises :class:`BadSample` naming the fault.

        Normalizes in place (embeddings → float32 ``[rows, D]``, a single caption → list) and
        returns ``self``. Does not decode the image (that is the decoder's job and cost).
        """
        from mobileclip2_jax.data.augment import decode_aug_params  # PIL-only, no cycle at import

        def bad(kind: str, msg: str) -> BadSample:
            return BadSample(kind, msg, key=self.key, source=source)

        if require_image:
            if self.image is None:
                raise bad("missing_key", "no image member (jpg/png/webp); image-less shards must "
                                         "be joined with their image shards by key")
            if len(self.image) == 0:
                raise bad("image_empty", "image bytes are empty")
        if self.image_ext not in IMAGE_EXTENSIONS:
            raise bad("missing_key", f"image extension {self.image_ext!r} not in {IMAGE_EXTENSIONS}")
        caps = [self.captions] if isinstance(self.captions, (str, bytes)) else list(self.captions)
        for i, c in enumerate(caps):
            if isinstance(c, bytes):
                try:
                    c = c.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise bad("caption", f"caption {i} is not UTF-8 ({e})") from None
            if not isinstance(c, str) or not c.strip():
                raise bad("caption", f"caption {i} is empty or not a string: {c!r}")
            caps[i] = c
        if not caps:
            raise bad("missing_key", "no ground-truth caption (txt)")
        self.captions = caps
        if not isinstance(self.syn_texts, Mapping):
            raise bad("bad_json", f"syn.json must be an object of key → list of captions; "
                                  f"got {type(self.syn_texts).__name__}")
        for k, v in self.syn_texts.items():
            if not isinstance(v, list) or not all(isinstance(s, str) and s.strip() for s in v):
                raise bad("bad_json" if not isinstance(v, list) else "caption",
                          f"syn.json[{k!r}] must be a list of non-empty strings")
        if not isinstance(self.param_aug, list) or not self.param_aug:
            raise bad("bad_aug", "paug.json param_aug must be a non-empty list")
        for a, p in enumerate(self.param_aug):
            if _plain_aug(p):  # the common, well-formed case, checked ~10× faster
                continue
            try:
                decode_aug_params(p)
            except (ValueError, TypeError) as e:
                raise bad("bad_aug", f"param_aug[{a}]: {e}") from None
        try:
            self.image_emb = _as_emb(self.image_emb, "image_emb", self.key)
            self.text_emb = _as_emb(self.text_emb, "text_emb", self.key)
            self.syn_text_embs = {k: _as_emb(v, f"{k}_emb", self.key)
                                  for k, v in self.syn_text_embs.items()}
        except BadSample as e:
            raise e.located(source=source) from None
        dim = self.embed_dim
        if metadata is not None and dim != metadata.embed_dim:
            raise bad("emb_dim", f"image_emb width {dim} ≠ metadata embed_dim "
                                 f"{metadata.embed_dim} (teachers {metadata.teacher_dims})")
        if self.image_emb.shape[0] != self.n_aug:
            raise bad("emb_shape", f"image_emb has {self.image_emb.shape[0]} rows for "
                                   f"{self.n_aug} stored augmentations")
        named = {"image_emb": self.image_emb, "text_emb": self.text_emb,
                 **{f"{k}_emb": v for k, v in self.syn_text_embs.items()}}
        for name, arr in named.items():
            if arr.shape[1] != dim:
                raise bad("emb_dim", f"{name} width {arr.shape[1]} ≠ image_emb width {dim}")
            if not np.isfinite(arr).all():
                raise bad("non_finite", f"{name} contains NaN or Inf")
        n_gt, n_text = len(caps), self.text_emb.shape[0]
        if n_text < n_gt:
            raise bad("emb_shape", f"text_emb has {n_text} rows for {n_gt} GT captions")
        if n_text > n_gt:  # legacy: GT rows then the rows of the (single) synthetic key
            n_syn = sum(len(v) for v in self.syn_texts.values())
            if n_text != n_gt + n_syn:
                raise bad("emb_shape", f"text_emb has {n_text} rows; the DataCompDR layout needs "
                                       f"{n_gt} GT + {n_syn} synthetic")
        else:
            for k, v in self.syn_texts.items():
                if k not in self.syn_text_embs:
                    raise bad("missing_key", f"no {k}_emb for synthetic key {k!r}")
                if self.syn_text_embs[k].shape[0] != len(v):
                    raise bad("emb_shape", f"{k}_emb has {self.syn_text_embs[k].shape[0]} rows "
                                           f"for {len(v)} captions")
        return self


def check_records_against_metadata(records: Sequence[ReinforcedRecord],
                                   metadata: DatasetMetadata, *, where: str = "dataset") -> None:
    """Dataset-wide check on a probe of records: raises :class:`SchemaError` before training.

    One record of the wrong width is a bad sample; *every* probed record disagreeing with the
    metadata means the metadata (or the dataset) is wrong, which no amount of skipping fixes.
    """
    if not records:
        raise SchemaError(f"{where}: no readable record to check against the metadata")
    dims = {int(np.shape(r.image_emb)[-1]) for r in records}
    if metadata.embed_dim not in dims:
        raise SchemaError(f"{where}: records have embedding width {sorted(dims)} but the metadata's "
                          f"teachers {[(t.name, t.dim) for t in metadata.teachers]} sum to "
                          f"{metadata.embed_dim}")
