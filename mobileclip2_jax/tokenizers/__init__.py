"""Text tokenizers (CLIP BPE; SentencePiece follows) behind one interface."""
from mobileclip2_jax.tokenizers.clip_bpe import ClipBpeTokenizer  # noqa: F401
