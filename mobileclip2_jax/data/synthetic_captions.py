"""Where a generated dataset's synthetic captions come from (``syn.json`` of each record).

MobileCLIP's reinforced data pairs every image with captions written by a captioning model
(CoCa, top-p 0.9; ``training_and_data.md`` §4.2). This module supplies them from what a user has:

* ``other_captions`` — the source's own captions beyond the ground truth: the other four human
  captions of a COCO image, the other prompt templates of an ImageFolder class;
* ``json`` — a JSON object ``{record key: [captions]}`` (the output of a captioner run elsewhere;
  a missing key is a record without synthetic captions, skipped and reported);
* ``templates`` — prompt templates filled with the class text of ImageFolder items;
* ``python`` — **the captioning-model slot**: ``factory = "package.module:function"``; the function
  is called once with the provider's config dict and returns ``caption(image, item) -> [str]``
  (``image`` a decoded RGB ``PIL.Image``, ``item`` the :class:`SourceItem`). A CoCa captioner, a
  VLM served elsewhere, or any other model goes here without touching the generator;
* ``none`` — no synthetic captions (the dataset then trains the ground-truth branch only).

Every provider is deterministic in the item, so a regenerated shard gets the same captions.
"""
from __future__ import annotations

import importlib
import json
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from PIL import Image

from mobileclip2_jax.data.sources import SourceItem

PROVIDER_KINDS = ("other_captions", "json", "templates", "python", "none")


class SyntheticCaptions:
    """``provider(item, image, n_gt) -> [captions]`` for one synthetic key (``syn.json`` entry)."""

    def __init__(self, kind: str = "other_captions", key: str = "syn_text", *,
                 json_path: Optional[str] = None, templates: Sequence[str] = (),
                 factory: Optional[str] = None, max_per_image: Optional[int] = None,
                 options: Optional[Mapping[str, Any]] = None):
        if kind not in PROVIDER_KINDS:
            raise ValueError(f"synthetic captions: kind must be one of {PROVIDER_KINDS}; got {kind!r}")
        if kind != "none" and (not isinstance(key, str) or not key or "." in key or key.endswith("_emb")):
            raise ValueError(f"synthetic captions: key must be a non-empty name without '.' and not "
                             f"ending in '_emb' (it becomes a syn.json key and '<key>_emb'); got {key!r}")
        if max_per_image is not None and (isinstance(max_per_image, bool) or int(max_per_image) < 1):
            raise ValueError(f"synthetic captions: max_per_image must be ≥ 1 or None; got {max_per_image!r}")
        self.kind, self.key = kind, key
        self.max_per_image = None if max_per_image is None else int(max_per_image)
        self.json_path, self.factory = json_path, factory
        self.templates = tuple(templates)
        self._table: Optional[Dict[str, List[str]]] = None
        self._fn: Optional[Callable[[Image.Image, SourceItem], List[str]]] = None
        if kind == "json":
            self._table = _load_caption_table(json_path)
        elif kind == "templates":
            if not self.templates or any(not isinstance(t, str) or t.count("{}") != 1 for t in self.templates):
                raise ValueError(f"synthetic captions: templates must be strings with exactly one "
                                 f"'{{}}'; got {self.templates!r}")
        elif kind == "python":
            self._fn = _load_factory(factory)(dict(options or {}))
            if not callable(self._fn):
                raise TypeError(f"synthetic captions: {factory} returned {type(self._fn).__name__}, "
                                f"expected a callable caption(image, item) -> [str]")

    @property
    def needs_image(self) -> bool:
        return self.kind == "python"

    def __call__(self, item: SourceItem, image: Optional[Image.Image], n_gt: int) -> List[str]:
        if self.kind == "none":
            return []
        if self.kind == "other_captions":
            caps = list(item.captions[n_gt:])
        elif self.kind == "json":
            caps = self._table.get(item.key)
            if caps is None and "image_id" in item.extra:
                caps = self._table.get(str(item.extra["image_id"]))
            caps = list(caps or [])
        elif self.kind == "templates":
            text = item.extra.get("class_text")
            if not text:
                raise ValueError(f"{item.key}: 'templates' synthetic captions need an ImageFolder "
                                 f"source (items with a class_text)")
            caps = [t.format(text) for t in self.templates]
        else:
            caps = self._fn(image, item)
            if isinstance(caps, str) or not isinstance(caps, (list, tuple)):
                raise TypeError(f"{self.factory}: caption(image, item) must return a list of "
                                f"strings; got {type(caps).__name__} for {item.key}")
        caps = [c.strip() for c in caps if isinstance(c, str) and c.strip()]
        return caps[:self.max_per_image] if self.max_per_image else caps

    def describe(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {"kind": self.kind, "key": self.key, "max_per_image": self.max_per_image}
        if self.kind == "json":
            d["json_path"] = os.path.abspath(self.json_path)
        if self.kind == "templates":
            d["templates"] = list(self.templates)
        if self.kind == "python":
            d["factory"] = self.factory
        return d


def _load_caption_table(path: Optional[str]) -> Dict[str, List[str]]:
    if not path:
        raise ValueError("synthetic captions: kind 'json' needs json_path")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: synthetic-caption JSON not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected an object {{record key: [captions]}}; got {type(data).__name__}")
    for k, v in data.items():
        if isinstance(v, str):
            data[k] = [v]
        elif not isinstance(v, list) or not all(isinstance(c, str) for c in v):
            raise ValueError(f"{path}: entry {k!r} must be a list of strings; got {v!r:.80}")
    return {str(k): v for k, v in data.items()}


def _load_factory(spec: Optional[str]) -> Callable[[Dict[str, Any]], Any]:
    if not spec or ":" not in spec:
        raise ValueError(f"synthetic captions: kind 'python' needs factory='package.module:function'; "
                         f"got {spec!r}")
    module_name, fn_name = spec.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(f"synthetic captions: cannot import {module_name!r} for {spec} ({e})") from None
    if not hasattr(module, fn_name):
        raise ValueError(f"synthetic captions: {module_name} has no {fn_name!r} (factory {spec})")
    return getattr(module, fn_name)
