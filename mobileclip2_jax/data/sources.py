"""Sources of (image, captions) pairs for *building* reinforced datasets, stdlib/numpy/PIL only.

The dataset generator (``training_and_data.md`` §4, §4.7) needs, per sample, the image exactly as
stored plus its ground-truth caption(s). Images are kept as the **original encoded bytes**: the
stored crop boxes are in pixels of that file and ``sha256`` in the record's ``json`` identifies
it, so re-encoding here would silently break replay against a re-downloaded original.

Three layouts cover the data we have and the usual public ones:

* :class:`ImageFolderSource` — ``root/<class>/<file>`` (torchvision ImageFolder); captions are
  prompt templates filled with a readable class name (classification sets as caption data);
* :class:`CocoCaptionsSource` — COCO captions JSON + image dir (5 human captions per image);
* :class:`ImageTextTarSource` — plain webdataset shards (``<key>.jpg`` + ``<key>.txt``
  [+ ``<key>.json``]), the img2dataset / DataComp layout.

All are indexed at construction (paths, offsets, captions only — small and picklable, so a
source can be sent to worker processes) and read image bytes lazily in ``__getitem__``. Order is
deterministic (sorted, or file order for COCO JSON and tars). Samples that cannot become a
record (no caption, missing image, bad sidecar JSON) are left out and listed in ``skipped`` with
the reason, because one bad item must not stop a generation run, but must not vanish silently.
"""
from __future__ import annotations

import dataclasses
import json
import operator
import os
import posixpath
import tarfile
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from mobileclip2_jax.data.records import IMAGE_EXTENSIONS

PathLike = Union[str, "os.PathLike[str]"]

# CLIP-style prompts; the first is the one a reinforced record takes as its GT caption.
DEFAULT_TEMPLATES: Tuple[str, ...] = (
    "a photo of a {}.", "a close-up photo of a {}.", "a cropped photo of a {}.",
    "a photo of the {}.", "a good photo of a {}.")

# Readable names for shared/data/clothing (its README: "longsleeve" → "long-sleeve shirt",
# "outwear" → "outerwear"); the other folder names already read well.
CLOTHING_CLASS_NAMES: Mapping[str, str] = {
    "dress": "dress", "hat": "hat", "longsleeve": "long-sleeve shirt", "outwear": "outerwear",
    "pants": "pants", "shirt": "shirt", "shoes": "shoes", "shorts": "shorts", "skirt": "skirt",
    "t-shirt": "t-shirt"}

# webdataset/open_clip ``rename(image="jpg;png;jpeg;webp")`` preference when a key has several.
_TAR_IMAGE_PREFERENCE = ("jpg", "png", "jpeg", "webp")


@dataclasses.dataclass
class SourceItem:
    """One sample to reinforce: original image bytes, their extension, GT captions, metadata."""
    key: str
    image: bytes
    image_ext: str
    captions: List[str]
    extra: Dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class SkippedItem:
    """A sample a source left out: its key, a short kind and a detail naming the file."""
    key: str
    kind: str  # "no_caption", "missing_image", "bad_json", "caption", "duplicate_key", …
    detail: str


class _Source:
    """Sequence protocol shared by the sources (``__len__``, ``__getitem__``, ``__iter__``)."""
    skipped: List[SkippedItem]

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> SourceItem:
        raise NotImplementedError

    def _index(self, index: int) -> int:
        n = len(self)
        if isinstance(index, bool):
            raise TypeError(f"{type(self).__name__} indices must be ints; got {index!r}")
        index = operator.index(index)  # ints and numpy integers; TypeError otherwise
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"{type(self).__name__} index {index} out of range (len {n})")
        return index

    def __iter__(self) -> Iterator[SourceItem]:
        for i in range(len(self)):
            yield self[i]

    def keys(self) -> List[str]:
        raise NotImplementedError


def _ext(path: str) -> str:
    return os.path.splitext(path)[1][1:].lower()


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# ---------------------------------------------------------------------------- ImageFolder
class ImageFolderSource(_Source):
    """``root/<class>/**/<file>.{jpg,jpeg,png,webp}`` with template captions per class.

    ``extra``: ``label`` (index in sorted class-folder order, as torchvision ImageFolder),
    ``class_name`` (the folder name), ``class_text`` (the readable name the captions use),
    ``path``. Keys are ``<class>/<relative path without extension>``; dots in the key are
    replaced by ``_`` because webdataset splits member names at the first dot, and a rare
    collision gets a ``_<n>`` suffix, so keys stay unique and stable for a given tree.
    """

    def __init__(self, root: PathLike, templates: Sequence[str] = DEFAULT_TEMPLATES,
                 class_names: Optional[Mapping[str, str]] = None):
        root = os.fspath(root)
        if not os.path.exists(root):
            raise FileNotFoundError(f"{root}: image folder not found (expected "
                                    f"root/<class>/<image>.{{{','.join(IMAGE_EXTENSIONS)}}})")
        if not os.path.isdir(root):
            raise ValueError(f"{root}: not a directory (expected an ImageFolder root)")
        if isinstance(templates, str) or not templates:
            raise ValueError(f"templates must be a non-empty sequence of strings with one '{{}}'"
                             f"; got {templates!r}")
        for t in templates:
            if not isinstance(t, str) or t.count("{}") != 1:
                raise ValueError(f"caption template {t!r} must contain exactly one '{{}}' "
                                 f"for the class name")
        self.root = os.path.abspath(root)
        self.templates = tuple(templates)
        self.classes = sorted(d for d in os.listdir(root)
                              if not d.startswith(".") and os.path.isdir(os.path.join(root, d)))
        if not self.classes:
            raise ValueError(f"{root}: no class folders (expected root/<class>/<image files>)")
        names = dict(class_names or {})
        self.class_texts = [names.get(c, c.replace("_", " ")) for c in self.classes]
        for c, text in zip(self.classes, self.class_texts):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"class_names[{c!r}] must be a non-empty string; got {text!r}")
        self.skipped: List[SkippedItem] = []
        self._items: List[Tuple[str, str, int]] = []  # key, relative path, label
        used: set = set()
        empty = []
        for label, cls in enumerate(self.classes):
            files = self._scan(os.path.join(self.root, cls))
            if not files:
                empty.append(cls)
            for rel in files:
                base = f"{cls}/{os.path.splitext(rel)[0]}".replace(os.sep, "/").replace(".", "_")
                key, n = base, 0
                while key in used:
                    n += 1
                    key = f"{base}_{n}"
                used.add(key)
                self._items.append((key, os.path.join(cls, rel), label))
        if not self._items:
            raise ValueError(f"{root}: no images found in {len(self.classes)} class folders "
                             f"(expected files ending in {IMAGE_EXTENSIONS})")
        # torchvision ImageFolder raises on an empty class; here the labels stay dense and
        # defined by folder order, so an empty class is just reported.
        self.skipped.extend(SkippedItem(c, "empty_class", f"{os.path.join(root, c)}: no images")
                            for c in empty)

    @staticmethod
    def _scan(folder: str) -> List[str]:
        out = []
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for f in sorted(filenames):
                if not f.startswith(".") and _ext(f) in IMAGE_EXTENSIONS:
                    out.append(os.path.relpath(os.path.join(dirpath, f), folder))
        return out

    def __len__(self) -> int:
        return len(self._items)

    def keys(self) -> List[str]:
        return [k for k, _, _ in self._items]

    def captions_for(self, label: int) -> List[str]:
        return [t.format(self.class_texts[label]) for t in self.templates]

    def __getitem__(self, index: int) -> SourceItem:
        key, rel, label = self._items[self._index(index)]
        path = os.path.join(self.root, rel)
        return SourceItem(key=key, image=_read(path), image_ext=_ext(path),
                          captions=self.captions_for(label),
                          extra={"label": label, "class_name": self.classes[label],
                                 "class_text": self.class_texts[label], "path": path})


# ------------------------------------------------------------------------------ COCO JSON
class CocoCaptionsSource(_Source):
    """COCO captions (``images[]``, ``annotations[{image_id, caption}]``) + the image folder.

    Items follow ``images[]`` order; captions keep annotation order (whitespace-stripped).
    ``extra``: ``image_id``, ``file_name``, ``license`` and, when the JSON has them, ``width``,
    ``height``, ``coco_url``. Images without a caption or without their file are skipped and
    listed in ``skipped``; captions of unknown image ids are counted there too.
    """

    def __init__(self, annotations_json: PathLike, image_dir: PathLike):
        ann, image_dir = os.fspath(annotations_json), os.fspath(image_dir)
        if not os.path.isfile(ann):
            raise FileNotFoundError(f"{ann}: COCO captions JSON not found")
        if not os.path.isdir(image_dir):
            raise FileNotFoundError(f"{image_dir}: COCO image directory not found")
        try:
            with open(ann, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{ann}: not valid JSON ({e})") from None
        if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
                or not isinstance(data.get("annotations"), list):
            got = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"{ann}: expected a COCO captions object with lists 'images' and "
                             f"'annotations'; got {got}")
        self.annotations_json, self.image_dir = os.path.abspath(ann), os.path.abspath(image_dir)
        self.skipped: List[SkippedItem] = []
        captions: Dict[Any, List[str]] = {}
        images = []
        for n, im in enumerate(data["images"]):
            if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
                raise ValueError(f"{ann}: images[{n}] must have 'id' and 'file_name'; got {im!r}")
            if im["id"] in captions:
                raise ValueError(f"{ann}: images[{n}]: duplicate image id {im['id']!r}")
            captions[im["id"]] = []
            images.append(im)
        orphans, unusable = 0, []
        for n, a in enumerate(data["annotations"]):
            if not isinstance(a, dict) or "image_id" not in a or "caption" not in a:
                raise ValueError(f"{ann}: annotations[{n}] must have 'image_id' and 'caption'; "
                                 f"got {a!r}")
            if a["image_id"] not in captions:
                orphans += 1
            elif isinstance(a["caption"], str) and a["caption"].strip():
                captions[a["image_id"]].append(a["caption"].strip())
            else:
                unusable.append(n)
        if unusable:  # dropped, so the GT caption is the next usable one: say so
            self.skipped.append(SkippedItem("", "bad_caption", f"{ann}: {len(unusable)} captions are "
                                            f"empty or not strings (annotations{unusable[:5]}); left out"))
        if orphans:
            self.skipped.append(SkippedItem("", "orphan_caption", f"{ann}: {orphans} captions "
                                            f"refer to image ids not in 'images'"))
        self._items: List[Tuple[str, List[str], Dict[str, Any]]] = []
        seen = set()
        for im in images:
            file_name = str(im["file_name"])
            key = os.path.splitext(os.path.basename(file_name))[0].replace(".", "_")
            if key in seen:
                raise ValueError(f"{ann}: two images map to key {key!r} ({file_name})")
            seen.add(key)
            path = os.path.normpath(os.path.join(self.image_dir, file_name))
            if not path.startswith(self.image_dir + os.sep):
                self.skipped.append(SkippedItem(key, "bad_path", f"{ann}: file_name {file_name!r} "
                                                f"points outside {self.image_dir}"))
            elif not captions[im["id"]]:
                self.skipped.append(SkippedItem(key, "no_caption",
                                                f"{ann}: image id {im['id']} has no caption"))
            elif not os.path.isfile(path):
                self.skipped.append(SkippedItem(key, "missing_image", f"{path}: not found"))
            else:
                extra = {"image_id": im["id"], "file_name": file_name,
                         "license": im.get("license")}
                extra.update({k: im[k] for k in ("width", "height", "coco_url") if k in im})
                self._items.append((key, captions[im["id"]], extra))
        if not self._items:
            raise ValueError(f"{ann}: no image with both a caption and a file in {image_dir} "
                             f"({len(self.skipped)} skipped: {self.skipped[:3]})")

    def __len__(self) -> int:
        return len(self._items)

    def keys(self) -> List[str]:
        return [k for k, _, _ in self._items]

    def __getitem__(self, index: int) -> SourceItem:
        key, caps, extra = self._items[self._index(index)]
        path = os.path.join(self.image_dir, extra["file_name"])
        return SourceItem(key=key, image=_read(path), image_ext=_ext(path),
                          captions=list(caps), extra=dict(extra))


# ---------------------------------------------------------------------------- webdataset tar
@dataclasses.dataclass(frozen=True)
class _TarEntry:
    tar: str
    member: str
    offset: int  # of the member's data in the (uncompressed) tar file; -1 for compressed tars
    size: int


class ImageTextTarSource(_Source):
    """Plain webdataset shards: ``<key>.{jpg,png,jpeg,webp}`` + ``<key>.txt`` [+ ``<key>.json``].

    The key is the member path up to the first dot of its base name (webdataset's rule), so
    ``a/b.url.txt`` belongs to key ``a/b`` and is ignored (only ``txt`` is a caption). Images are
    read by offset on demand; captions and the JSON sidecar are read at indexing. ``extra``:
    ``tar``, ``member`` and the sidecar's fields (a non-object sidecar goes in ``extra["json"]``).
    """

    def __init__(self, tar_paths: Union[PathLike, Sequence[PathLike]]):
        if isinstance(tar_paths, (str, os.PathLike)):
            tar_paths = [tar_paths]
        self.tar_paths = [os.path.abspath(os.fspath(p)) for p in tar_paths]
        if not self.tar_paths:
            raise ValueError("ImageTextTarSource needs at least one tar path")
        self.skipped: List[SkippedItem] = []
        self._items: List[Tuple[str, _TarEntry, str, Dict[str, Any]]] = []
        seen = set()
        for path in self.tar_paths:
            for key, item in self._scan(path):
                if key in seen:
                    self.skipped.append(SkippedItem(key, "duplicate_key",
                                                    f"{path}: key already seen in an earlier "
                                                    f"shard; kept the first"))
                    continue
                seen.add(key)
                self._items.append((key, *item))
        if not self._items:
            raise ValueError(f"{self.tar_paths}: no image + txt pairs found (expected members "
                             f"<key>.{{{','.join(IMAGE_EXTENSIONS)}}} and <key>.txt)")

    def _scan(self, path: str):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: tar shard not found")
        groups: Dict[str, Dict[str, tarfile.TarInfo]] = {}
        try:  # plain tars are read by offset; compressed ones (.tar.gz, …) through tarfile
            with tarfile.open(path, "r:") as tf:
                compressed = False
        except tarfile.ReadError:
            compressed = True
        try:
            with tarfile.open(path, "r:*") as tf:
                members = tf.getmembers()
                for m in members:
                    base = os.path.basename(m.name)
                    if not m.isfile() or base.startswith(".") or base.startswith("__"):
                        continue
                    stem, dot, ext = base.partition(".")
                    if not dot:
                        continue
                    key = posixpath.normpath(posixpath.join(posixpath.dirname(m.name), stem))
                    groups.setdefault(key, {})[ext.lower()] = m
                texts = {}
                for key, g in groups.items():
                    texts[key] = {e: tf.extractfile(g[e]).read() for e in ("txt", "json") if e in g}
        except tarfile.TarError as e:
            raise ValueError(f"{path}: not a readable tar file ({e})") from None
        for key, g in groups.items():
            image_ext = next((e for e in _TAR_IMAGE_PREFERENCE if e in g), None)
            if image_ext is None:
                if "txt" in g:
                    self.skipped.append(SkippedItem(key, "missing_image", f"{path}: {key}.txt "
                                                    f"has no image member"))
                continue
            if "txt" not in g:
                self.skipped.append(SkippedItem(key, "no_caption", f"{path}: "
                                                f"{g[image_ext].name} has no {key}.txt"))
                continue
            try:
                caption = texts[key]["txt"].decode("utf-8").strip()
            except UnicodeDecodeError as e:
                self.skipped.append(SkippedItem(key, "caption", f"{path}: {key}.txt is not "
                                                f"UTF-8 ({e})"))
                continue
            if not caption:
                self.skipped.append(SkippedItem(key, "no_caption", f"{path}: {key}.txt is empty"))
                continue
            extra: Dict[str, Any] = {}
            if "json" in texts[key]:
                try:
                    side = json.loads(texts[key]["json"].decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    self.skipped.append(SkippedItem(key, "bad_json", f"{path}: {key}.json is "
                                                    f"not valid JSON ({e})"))
                    continue
                extra.update(side if isinstance(side, dict) else {"json": side})
            m = g[image_ext]
            offset = -1 if compressed else m.offset_data
            yield key, (_TarEntry(path, m.name, offset, m.size), caption, extra)

    def __len__(self) -> int:
        return len(self._items)

    def keys(self) -> List[str]:
        return [k for k, _, _, _ in self._items]

    def __getitem__(self, index: int) -> SourceItem:
        key, entry, caption, extra = self._items[self._index(index)]
        if entry.offset < 0:
            with tarfile.open(entry.tar, "r:*") as tf:
                data = tf.extractfile(entry.member).read()
        else:
            with open(entry.tar, "rb") as f:
                f.seek(entry.offset)
                data = f.read(entry.size)
        if len(data) != entry.size:
            raise ValueError(f"{entry.tar}: member {entry.member} truncated ({len(data)} of "
                             f"{entry.size} bytes); the shard changed after indexing?")
        return SourceItem(key=key, image=data, image_ext=_ext(entry.member),
                          captions=[caption],
                          extra={**extra, "tar": entry.tar, "member": entry.member})
