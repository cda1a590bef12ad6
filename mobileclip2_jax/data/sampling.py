"""Per-example choices of the reinforced-data trainer: which augmentation, caption, synthetic text.

A reinforced record stores many views of one image (``N_aug`` augmentations with a teacher image
embedding each) and several captions (ground truth + synthetic, each with teacher text
embeddings). Each time the trainer visits a record it uses **one** augmented view, **one**
ground-truth caption and **one** synthetic caption, plus the teacher embeddings of exactly
those choices (``training_and_data.md`` §1.5, §9.4; reference: v2 patch ``preprocess_dr``):

====================  ===========================================  ==========================
item                  random (default)                             ``sequential=True``
====================  ===========================================  ==========================
augmentation          uniform over stored augs                     ``epoch % n_aug``
ground-truth caption  uniform over GT captions (usually 1)         ``epoch % n_gt``
synthetic key         uniform over keys matching the regex         uniform (as the reference)
synthetic caption     uniform within the key                       ``epoch % n_syn``
====================  ===========================================  ==========================

The reference draws from the global ``np.random`` state of each loader worker, so its choices
depend on worker count and order. Here every draw comes from ``np.random.default_rng`` seeded
by a hash (``SeedSequence``) of ``(seed, record index, epoch)``: a resumed or re-sharded run makes
the same choices for the same record and epoch, whatever the number or order of workers. The
same five numbers are drawn in the same order whatever the options, so changing e.g.
``sequential`` does not reshuffle the other choices.

Embedding alignment rules (§1.2): ``image_emb[a]`` belongs to ``param_aug[a]``; ``text_emb[c]`` to
GT caption ``c``; synthetic caption ``s`` of key ``k`` is ``text_emb[n_gt + s]`` in the legacy
DataCompDR layout (detected, as the reference does, by ``len(text_emb) > n_gt``) and
``<k>_emb[s]`` otherwise (DFNDR). Everything is validated up front, for every matching key, so a
malformed record fails on every visit with a message naming the problem rather than only in
the epochs that happen to pick the bad part.

Coupling to the record schema is kept minimal: :func:`sample_example` takes the plain lists
and arrays it needs; :func:`sample_record` reads them by name from a mapping or an object.
No JAX or torch: this runs in Grain worker processes.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, List, Mapping, Optional, Sequence

import numpy as np

DEFAULT_SYN_TEXT_KEY_REGEX = r"^syn_text.*$"
# Mixed into every seed so these draws never coincide with another (seed, index)-keyed stream
# (e.g. a shuffle) that uses the same two integers.
_STREAM_TAG = 0x53414D50  # "SAMP"


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """The trainer's ``--dataset-reinforcement-*`` sampling flags.

    ``mix_synthetic_ratio``: ``None`` keeps both branches (GT and synthetic caption, two losses);
    a value ``r`` is the reference's ``--…-mix-synthetic --…-mix-synthetic-ratio r``: with
    probability ``r`` the GT caption/embedding is replaced by the synthetic one, and the
    synthetic branch is always dropped.
    """
    seed: int = 0
    syn_text_key_regex: str = DEFAULT_SYN_TEXT_KEY_REGEX
    sequential: bool = False
    mix_synthetic_ratio: Optional[float] = None

    def __post_init__(self):
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) \
                or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer; got {self.seed!r}")
        try:
            re.compile(self.syn_text_key_regex)
        except re.error as e:
            raise ValueError(f"bad syn_text_key_regex {self.syn_text_key_regex!r}: {e}") from None
        if self.mix_synthetic_ratio is not None and not 0.0 <= self.mix_synthetic_ratio <= 1.0:
            raise ValueError(f"mix_synthetic_ratio must be in [0, 1]; "
                             f"got {self.mix_synthetic_ratio}")


@dataclasses.dataclass(frozen=True)
class SampleChoice:
    """Indices chosen for one visit of one record."""
    aug_index: int
    caption_index: int
    syn_key: str
    syn_index: int
    syn_replaces_caption: bool = False  # only in mix-synthetic mode


@dataclasses.dataclass(frozen=True)
class SampledExample:
    """What the pipeline needs next: the stored aug to replay, texts, fp32 teacher embeddings.

    ``syn_caption`` and ``syn_text_emb`` are ``None`` in mix-synthetic mode (single loss).
    """
    choice: SampleChoice
    aug_params: Any
    caption: str
    syn_caption: Optional[str]
    image_emb: np.ndarray
    text_emb: np.ndarray
    syn_text_emb: Optional[np.ndarray]


def sample_rng(seed: int, index: int, epoch: int = 0) -> np.random.Generator:
    """The generator for one (seed, record index, epoch); independent of worker layout."""
    for name, value in (("seed", seed), ("index", index), ("epoch", epoch)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer; got {value!r}")
    return np.random.default_rng(np.random.SeedSequence(
        [_STREAM_TAG, int(seed), int(index), int(epoch)]))


def matching_syn_keys(syn_texts: Mapping[str, Sequence[str]],
                      regex: str = DEFAULT_SYN_TEXT_KEY_REGEX) -> List[str]:
    """Keys matched by ``re.match(regex, key)`` that hold at least one caption, sorted.

    Sorting makes the choice independent of the reader's key order. Raises ``ValueError`` when
    none is left.
    """
    if not isinstance(syn_texts, Mapping):
        raise ValueError(f"synthetic captions must be a mapping key → list of captions; got "
                         f"{type(syn_texts).__name__}")
    keys = sorted(k for k, v in syn_texts.items() if re.match(regex, k) and len(v) > 0)
    if not keys:
        raise ValueError(f"no synthetic-caption key matches {regex!r} with at least one caption; "
                         f"keys present: {sorted(syn_texts)}")
    return keys


def choose(*, n_aug: int, n_captions: int, syn_counts: Mapping[str, int], index: int,
           epoch: int = 0, config: SamplingConfig = SamplingConfig()) -> SampleChoice:
    """Draws the indices for one visit. ``syn_counts``: eligible synthetic key → #captions."""
    if n_aug < 1 or n_captions < 1:
        raise ValueError(f"need at least one augmentation and one caption; got n_aug={n_aug}, "
                         f"n_captions={n_captions}")
    keys = sorted(syn_counts)
    if not keys or min(syn_counts.values()) < 1:
        raise ValueError(f"need at least one synthetic key with captions; got {dict(syn_counts)}")
    rng = sample_rng(config.seed, index, epoch)
    # Always the same five draws, in this order (see module docstring).
    aug = int(rng.integers(n_aug))
    cap = int(rng.integers(n_captions))
    key = keys[int(rng.integers(len(keys)))]
    n_syn = syn_counts[key]
    syn = int(rng.integers(n_syn))
    mix_draw = float(rng.random())
    if config.sequential:
        aug, cap, syn = epoch % n_aug, epoch % n_captions, epoch % n_syn
    replace = config.mix_synthetic_ratio is not None and mix_draw < config.mix_synthetic_ratio
    return SampleChoice(aug, cap, key, syn, replace)


def _rows(x: Any, what: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{what} must be 2-D [rows, D]; got shape {arr.shape}")
    return arr


def _syn_emb_for(syn_text_embs: Optional[Mapping[str, Any]], key: str) -> Optional[Any]:
    if syn_text_embs is None:
        return None
    for name in (key, f"{key}_emb"):
        if name in syn_text_embs:
            return syn_text_embs[name]
    return None


def sample_example(*, param_aug: Sequence[Any], captions: Any,
                   syn_texts: Mapping[str, Sequence[str]], image_emb: Any, text_emb: Any,
                   syn_text_embs: Optional[Mapping[str, Any]] = None, index: int, epoch: int = 0,
                   config: SamplingConfig = SamplingConfig()) -> SampledExample:
    """Validates one record and returns the choices for (``config.seed``, ``index``, ``epoch``).

    Args:
      param_aug: stored augmentations (``paug.json["param_aug"]``), one per ``image_emb`` row.
      captions: the GT caption, or a list of them (``txt``).
      syn_texts: ``syn.json``: key → list of synthetic captions.
      image_emb: ``[n_aug, D]``; text_emb: ``[n_gt, D]`` or legacy ``[n_gt + n_syn, D]``.
      syn_text_embs: key → ``[n_syn, D]`` for the non-legacy layout; entries may be named
        ``<key>`` or ``<key>_emb`` (so the decoded ``npz`` dict can be passed as is).

    Raises ``ValueError`` naming the mismatch (no matching key, rows ≠ number of augs, …).
    """
    captions = [captions] if isinstance(captions, str) else list(captions)
    if not captions:
        raise ValueError("the record has no ground-truth caption")
    n_aug, n_gt = len(param_aug), len(captions)
    image_emb = _rows(image_emb, "image_emb")
    text_emb = _rows(text_emb, "text_emb")
    if n_aug == 0:
        raise ValueError("the record stores no augmentation (param_aug is empty)")
    if image_emb.shape[0] != n_aug:
        raise ValueError(f"image_emb has {image_emb.shape[0]} rows but the record stores {n_aug} "
                         f"augmentations; rows must align with param_aug")
    dim = image_emb.shape[1]
    if text_emb.shape[1] != dim:
        raise ValueError(f"text_emb dim {text_emb.shape[1]} ≠ image_emb dim {dim}")
    if text_emb.shape[0] < n_gt:
        raise ValueError(f"text_emb has {text_emb.shape[0]} rows for {n_gt} ground-truth captions")
    keys = matching_syn_keys(syn_texts, config.syn_text_key_regex)
    legacy = text_emb.shape[0] > n_gt  # the reference's test for GT+syn rows in text_emb
    syn_embs = {}
    for key in keys:
        n_syn = len(syn_texts[key])
        if legacy:
            if text_emb.shape[0] != n_gt + n_syn:
                raise ValueError(
                    f"legacy layout: text_emb has {text_emb.shape[0]} rows, expected {n_gt} GT + "
                    f"{n_syn} synthetic ({key!r}); matching keys {keys} (the legacy layout holds a "
                    f"single synthetic key)")
            continue
        emb = _syn_emb_for(syn_text_embs, key)
        if emb is None:
            raise ValueError(f"no embeddings for synthetic key {key!r} (expected {key + '_emb'!r}, "
                             f"text_emb holds only the {n_gt} GT rows)")
        emb = _rows(emb, f"{key}_emb")
        if emb.shape != (n_syn, dim):
            raise ValueError(f"{key}_emb has shape {emb.shape}, expected ({n_syn}, {dim}) for "
                             f"{n_syn} captions")
        syn_embs[key] = emb

    choice = choose(n_aug=n_aug, n_captions=n_gt, index=index, epoch=epoch, config=config,
                    syn_counts={k: len(syn_texts[k]) for k in keys})
    key, s = choice.syn_key, choice.syn_index
    syn_caption = str(syn_texts[key][s])
    syn_emb = text_emb[n_gt + s] if legacy else syn_embs[key][s]
    caption, cap_emb = str(captions[choice.caption_index]), text_emb[choice.caption_index]
    if config.mix_synthetic_ratio is not None:
        if choice.syn_replaces_caption:
            caption, cap_emb = syn_caption, syn_emb
        syn_caption, syn_emb = None, None
    f32 = lambda a: None if a is None else np.asarray(a, dtype=np.float32)  # noqa: E731
    return SampledExample(choice=choice, aug_params=param_aug[choice.aug_index], caption=caption,
                          syn_caption=syn_caption, image_emb=f32(image_emb[choice.aug_index]),
                          text_emb=f32(cap_emb), syn_text_emb=f32(syn_emb))


RECORD_FIELDS = ("param_aug", "captions", "syn_texts", "image_emb", "text_emb", "syn_text_embs")


def sample_record(record: Any, index: int, epoch: int = 0,
                  config: SamplingConfig = SamplingConfig()) -> SampledExample:
    """:func:`sample_example` on a record exposing :data:`RECORD_FIELDS` as keys or attributes.

    ``syn_text_embs`` is optional (legacy layout). Missing required fields raise ``ValueError``.
    """
    def get(name: str, required: bool = True) -> Any:
        if isinstance(record, Mapping):
            if name in record:
                return record[name]
        elif hasattr(record, name):
            return getattr(record, name)
        if required:
            raise ValueError(f"record has no {name!r} (needs {RECORD_FIELDS[:-1]})")
        return None

    return sample_example(param_aug=get("param_aug"), captions=get("captions"),
                          syn_texts=get("syn_texts"), image_emb=get("image_emb"),
                          text_emb=get("text_emb"), syn_text_embs=get("syn_text_embs", False),
                          index=index, epoch=epoch, config=config)
