"""CLIP BPE ids equal open_clip's ``get_tokenizer("MobileCLIP2-S0")`` on varied real captions."""
import json
import pathlib
import random

import numpy as np
import pytest

from conftest import requires_torch
from mobileclip2_jax.tokenizers import ClipBpeTokenizer

COCO = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "coco_mini" / "annotations" / "captions_train2017.json"


def caption_corpus():
    """≥1,000 captions: real COCO captions plus unicode, emoji, HTML entities, accents,
    mojibake, whitespace runs, digits, contractions, special-token strings, empty and very
    long texts."""
    real = [a["caption"] for a in json.loads(COCO.read_text())["annotations"]] if COCO.exists() else []
    base = real or ["A man riding a wave on top of a surfboard.", "Two dogs play in the snow."]
    extras = ["", " ", "\t\n", "a", "A PHOTO OF A CAT", "café crème brûlée", "naïve résumé façade",
              "Ünïcödé ßtraße Ωmega ελληνικά русский", "東京の夜景 写真", "한국어 문장", "مرحبا بالعالم",
              "🐶🐱 emoji 👍🏽 family 👨‍👩‍👧‍👦", "fish &amp; chips &lt;b&gt;bold&lt;/b&gt; &amp;amp;",
              "cafÃ© mojibake â€™quoteâ€™", "it's they're we've I'm you'll he'd", "1234567890 3.14 1,000,000",
              "<start_of_text> literal <end_of_text> tokens", "hyphen-ated under_score slash/es",
              "   lots    of     whitespace   \n\n between  ", "ALLCAPS and MiXeD CaSe", "x" * 300,
              " ".join(["word"] * 200), "\u200b zero\u00a0width\u2009spaces", "tab\tseparated\tvalues",
              "emoji-only 🎉🎉🎉", "math ∑∫√∞ ≠ ≤ ≥", "quotes “curly” ‘single’ «guillemets»"]
    rng = random.Random(0)
    corpus = list(base) + extras
    while len(corpus) < 1200:
        a, b = rng.choice(base), rng.choice(extras + base)
        kind = rng.randrange(5)
        corpus.append({0: a.upper(), 1: f"{a} {b}", 2: " ".join([a] * rng.randint(3, 8)),
                       3: a.replace(" ", "  \t "), 4: f"&quot;{a}&quot; — {b[::-1]}"}[kind])
    return corpus


@pytest.fixture(scope="module")
def ours():
    return ClipBpeTokenizer()


@requires_torch
def test_ids_equal_open_clip(ours):
    import open_clip
    ref_tok = open_clip.get_tokenizer("MobileCLIP2-S0")
    corpus = caption_corpus()
    assert len(corpus) >= 1000
    ref = ref_tok(corpus).numpy()
    got = ours(corpus)
    mismatch = [i for i in range(len(corpus)) if not np.array_equal(ref[i], got[i])]
    assert not mismatch, f"{len(mismatch)} captions differ, first: {corpus[mismatch[0]]!r}"


def test_row_format_and_truncation(ours):
    corpus = caption_corpus()
    ids = ours(corpus)
    assert ids.shape == (len(corpus), 77) and ids.dtype == np.int32
    assert (ids[:, 0] == 49406).all()
    for text, row in zip(corpus, ids):
        nonpad = np.flatnonzero(row)
        assert row[nonpad[-1]] == 49407 and nonpad[-1] == len(nonpad) - 1
        if "<end_of_text>" not in text:
            assert (row == 49407).sum() == 1
    long = ours("word " * 500)[0]
    assert long[-1] == 49407 and (long != 0).all()
    assert ours("")[0, :3].tolist() == [49406, 49407, 0]
    assert ours(["a photo of a cat"])[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_decode_round_trip(ours):
    assert ours.decode(ours("A photo of a café, 2 dogs!")[0]) == "a photo of a café , 2 dogs !"


def test_bad_input(ours, tmp_path):
    with pytest.raises(TypeError, match=r"texts\[1\] is int"):
        ours(["ok", 3])
    bad = tmp_path / "bad.txt.gz"
    import gzip
    bad.write_bytes(gzip.compress(b"header\nonly one line\n"))
    with pytest.raises(ValueError, match="malformed"):
        ClipBpeTokenizer(str(bad))
