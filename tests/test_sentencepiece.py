"""SentencePiece tokenizer: trained on real captions, CLIP-tokenizer interface, wired into the tower."""
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobileclip2_jax.models.text import TextConfig, TextTransformer
from mobileclip2_jax.tokenizers import SentencePieceTokenizer, train_sentencepiece
from mobileclip2_jax.tokenizers.clip_bpe import clean_text

COCO = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "coco_mini" / "annotations" / "captions_train2017.json"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    if not COCO.exists():
        pytest.skip(f"{COCO} not present")
    caps = [a["caption"] for a in json.loads(COCO.read_text())["annotations"]]
    path = str(tmp_path_factory.mktemp("sp") / "coco.model")
    train_sentencepiece(caps, path, vocab_size=400)
    return SentencePieceTokenizer(path), caps


def test_interface_and_round_trip(tokenizer):
    tok, caps = tokenizer
    assert tok.vocab_size == 403 and tok.eot_token_id == 402 and tok.sot_token_id == 401
    ids = tok(caps)
    assert ids.shape == (len(caps), 77) and ids.dtype == np.int32
    assert (ids[:, 0] == tok.sot_token_id).all()
    assert (ids.max(axis=1) == tok.eot_token_id).all()          # argmax pooling finds EOT
    assert ((ids == tok.eot_token_id).sum(axis=1) == 1).all()
    for cap, row in zip(caps[:50], ids[:50]):
        assert tok.decode(row) == clean_text(cap)
    long = tok("a man riding a wave " * 100)[0]
    assert long[-1] == tok.eot_token_id and (long != 0).all()


def test_vocab_size_wired_into_text_tower(tokenizer):
    tok, caps = tokenizer
    cfg = TextConfig(width=64, heads=1, layers=1, embed_dim=32, vocab_size=tok.vocab_size)
    ids = jnp.asarray(tok(caps[:4]))
    variables = TextTransformer(cfg).init(jax.random.key(0), ids)
    assert variables["params"]["token_embedding"].shape == (tok.vocab_size, 64)
    assert TextTransformer(cfg).apply(variables, ids).shape == (4, 32)


def test_bad_model_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        SentencePieceTokenizer(str(tmp_path / "missing.model"))
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        SentencePieceTokenizer(str(bad))
    with pytest.raises(ValueError, match="no non-empty"):
        train_sentencepiece(["", "  "], str(tmp_path / "x.model"), vocab_size=10)
