"""Text tokenizers (CLIP BPE; SentencePiece follows) behind one interface."""
from mobileclip2_jax.tokenizers.clip_bpe import ClipBpeTokenizer  # noqa: F401
from mobileclip2_jax.tokenizers.sentencepiece_tokenizer import SentencePieceTokenizer, train_sentencepiece  # noqa: F401,E501
