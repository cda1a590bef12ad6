"""SentencePiece tokenizer with the CLIP tokenizer's interface, for new-vocabulary ablations.

Id layout (so that padding, pooling and the text tower need no special cases):
``0`` = padding, ``1 … V`` = the SentencePiece pieces (SentencePiece id + 1),
``V + 1`` = start-of-text, ``V + 2`` = end-of-text. End-of-text is the largest id, so the text
tower's pooling at ``argmax(ids)`` finds it, as with CLIP BPE; build the text tower with
``TextConfig(vocab_size=tokenizer.vocab_size)``. Texts are cleaned like CLIP's (ftfy, HTML
unescape, whitespace, lower-case) unless ``lowercase=False``.
"""
from __future__ import annotations

import io
import os
from typing import Iterable, List, Optional, Sequence, Union

import numpy as np
import sentencepiece as spm

from mobileclip2_jax.tokenizers.clip_bpe import CONTEXT_LENGTH, clean_text, pack_token_ids


def train_sentencepiece(texts: Iterable[str], model_path: str, vocab_size: int,
                        model_type: str = "unigram", lowercase: bool = True) -> str:
    """Trains a SentencePiece model on ``texts`` and writes it to ``model_path`` (``.model``).

    Returns the path. The write is atomic (temporary name, then rename) so an interrupted run
    never leaves a truncated model behind.
    """
    if model_type not in ("unigram", "bpe", "char", "word"):
        raise ValueError(f"model_type must be unigram|bpe|char|word, got {model_type!r}")
    cleaned = [clean_text(t) if lowercase else " ".join(t.split()) for t in texts]
    cleaned = [t for t in cleaned if t]
    if not cleaned:
        raise ValueError("train_sentencepiece: no non-empty training texts")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(cleaned), model_writer=buf, vocab_size=vocab_size,
        model_type=model_type, character_coverage=1.0, unk_id=0, bos_id=-1, eos_id=-1,
        pad_id=-1, hard_vocab_limit=True, minloglevel=2)
    tmp = f"{model_path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
    os.replace(tmp, model_path)
    return model_path


class SentencePieceTokenizer:
    """``tokenizer(texts) -> int32 (N, context_length)``: SOT, pieces, EOT, zero padding."""

    def __init__(self, model_path: str, context_length: int = CONTEXT_LENGTH, lowercase: bool = True):
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"SentencePiece model {model_path!r} not found "
                                    f"(train one with train_sentencepiece)")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.load(model_path)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{model_path!r} is not a SentencePiece model: {e}") from e
        self.context_length = context_length
        self.lowercase = lowercase
        n = self.sp.get_piece_size()
        self.sot_token_id = n + 1
        self.eot_token_id = n + 2
        self.pad_token_id = 0
        self.vocab_size = n + 3

    def _clean(self, text: str) -> str:
        return clean_text(text) if self.lowercase else " ".join(text.split())

    def encode(self, text: str) -> List[int]:
        return [i + 1 for i in self.sp.encode(self._clean(text))]

    def decode(self, ids: Iterable[int]) -> str:
        pieces = [int(i) - 1 for i in ids if 0 < int(i) < self.sot_token_id]
        return self.sp.decode(pieces)

    def __call__(self, texts: Union[str, Sequence[str]],
                 context_length: Optional[int] = None) -> np.ndarray:
        """``(N, context_length)`` int32 ids: SOT, pieces, EOT, zeros. Never raises on length."""
        return pack_token_ids(texts, self.encode, self.sot_token_id, self.eot_token_id,
                              context_length or self.context_length)
