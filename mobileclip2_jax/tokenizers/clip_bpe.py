"""The OpenAI CLIP byte-level BPE tokenizer, producing ids identical to open_clip's.

MobileCLIP and MobileCLIP2 text towers use open_clip's ``SimpleTokenizer`` (vocab 49408,
context 77, clean mode ``"lower"``). This is an independent implementation of the same
algorithm, needing neither torch nor open_clip:

1. clean: ``ftfy.fix_text``, HTML-unescape twice, collapse whitespace runs, strip, lower-case;
2. split into words with CLIP's regex (contractions, letter runs, single digits, runs of other
   non-space characters);
3. map each word's UTF-8 bytes to printable unicode symbols, mark the word end with ``</w>``,
   and apply the ranked merges greedily (lowest rank first) until none applies;
4. wrap in ``<start_of_text>`` (49406) … ``<end_of_text>`` (49407), zero-pad to the context
   length; longer texts are truncated and the last kept position becomes ``<end_of_text>``,
   so every row ends in an end-of-text token (the text towers pool at the first one). As in
   open_clip, the literal strings ``<start_of_text>``/``<end_of_text>`` in a text are read as
   the special tokens.

The merges file ``bpe_simple_vocab_16e6.txt.gz`` ships as package data; it comes from
open_clip (MIT licence, see ``LICENSE.open_clip`` beside it).
"""
from __future__ import annotations

import functools
import gzip
import html
import importlib.resources
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import ftfy
import numpy as np
import regex

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # merges used by CLIP: 48894 (vocab = 2·256 bytes + merges + 2)
SOT, EOT = "<start_of_text>", "<end_of_text>"
CONTEXT_LENGTH = 77
_WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


@functools.lru_cache(maxsize=1)
def byte_to_symbol() -> Dict[int, str]:
    """Reversible map of the 256 byte values to printable unicode characters.

    Printable Latin-1 bytes map to themselves; the other 68 (controls, space, …) map to
    code points 256, 257, … in byte order, so no BPE symbol is whitespace or a control.
    The dict's *insertion order* (printable bytes first, then the remapped ones) is the order
    of the first 256 vocabulary entries, so it is part of the id assignment.
    """
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def clean_text(text: str) -> str:
    """open_clip's ``"lower"`` cleaning: ftfy, double HTML unescape, whitespace, lower-case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).strip().lower()


def _load_merges(path: Optional[str]) -> List[Tuple[str, str]]:
    if path is None:
        data = importlib.resources.files("mobileclip2_jax.tokenizers").joinpath(VOCAB_FILE).read_bytes()
    else:
        with open(path, "rb") as f:
            data = f.read()
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]
    bad = [i for i, m in enumerate(merges) if len(m) != 2]
    if len(merges) != NUM_MERGES or bad:
        raise ValueError(f"BPE merges file {path or VOCAB_FILE!r} is malformed: expected "
                         f"{NUM_MERGES} lines of two symbols after the header, got "
                         f"{len(merges)} lines ({len(bad)} malformed)")
    return merges


def pack_token_ids(texts: Union[str, Sequence[str]], encode: Callable[[str], List[int]],
                   sot_id: int, eot_id: int, context_length: int) -> np.ndarray:
    """``(N, context_length)`` int32: SOT, ``encode(text)``, EOT, zero padding.

    Shared by every tokenizer so all follow one rule: longer texts are truncated and the last
    kept position becomes EOT, so a row always ends in EOT and nothing ever raises on length.
    """
    if isinstance(texts, str):
        texts = [texts]
    out = np.zeros((len(texts), context_length), np.int32)
    for row, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{row}] is {type(text).__name__}, expected str")
        ids = [sot_id] + encode(text) + [eot_id]
        if len(ids) > context_length:
            ids = ids[:context_length]
            ids[-1] = eot_id
        out[row, :len(ids)] = ids
    return out


class ClipBpeTokenizer:
    """CLIP BPE tokenizer: ``tokenizer(texts) -> int32 array (N, context_length)``."""

    def __init__(self, merges_path: Optional[str] = None, context_length: int = CONTEXT_LENGTH):
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (start + end token), got {context_length}")
        merges = _load_merges(merges_path)
        symbols = list(byte_to_symbol().values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
        self.encoder: Dict[str, int] = {tok: i for i, tok in enumerate(vocab)}
        self.decoder: Dict[int, str] = {i: tok for tok, i in self.encoder.items()}
        self.merge_rank: Dict[Tuple[str, str], int] = {m: i for i, m in enumerate(merges)}
        self.byte_encoder = byte_to_symbol()
        self.byte_decoder = {s: b for b, s in self.byte_encoder.items()}
        self.pattern = regex.compile(f"{regex.escape(SOT)}|{regex.escape(EOT)}|{_WORD_PATTERN}",
                                     regex.IGNORECASE)
        self.context_length = context_length
        self.vocab_size = len(vocab)
        self.sot_token_id = self.encoder[SOT]
        self.eot_token_id = self.encoder[EOT]
        self.pad_token_id = 0
        self._cache: Dict[str, Tuple[str, ...]] = {SOT: (SOT,), EOT: (EOT,)}

    def _bpe(self, word: str) -> Tuple[str, ...]:
        """Merged BPE symbols of one pre-tokenized word (byte symbols, no ``</w>`` yet)."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            ranks = [self.merge_rank.get(pair, None) for pair in zip(parts, parts[1:])]
            best = min((r for r in ranks if r is not None), default=None)
            if best is None:
                break
            first, second = next(p for p, r in zip(zip(parts, parts[1:]), ranks) if r == best)
            merged, i = [], 0
            while i < len(parts):  # merge every non-overlapping occurrence, left to right
                if i < len(parts) - 1 and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        result = tuple(parts)
        if len(self._cache) < 1_000_000:
            self._cache[word] = result
        return result

    def encode(self, text: str) -> List[int]:
        """Token ids of ``text`` without start/end tokens or padding."""
        ids = []
        for word in self.pattern.findall(clean_text(text)):
            symbols = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            ids.extend(self.encoder[s] for s in self._bpe(symbols))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids; special and padding tokens are dropped."""
        special = {self.sot_token_id, self.eot_token_id, self.pad_token_id}
        text = "".join(self.decoder[int(i)] for i in ids if int(i) not in special)
        data = bytearray(self.byte_decoder[c] for c in text)
        return data.decode("utf-8", errors="replace").replace("</w>", " ").strip()

    def __call__(self, texts: Union[str, Sequence[str]],
                 context_length: Optional[int] = None) -> np.ndarray:
        """``(N, context_length)`` int32 ids: SOT, tokens, EOT, zeros. Never raises on length."""
        return pack_token_ids(texts, self.encode, self.sot_token_id, self.eot_token_id,
                              context_length or self.context_length)
