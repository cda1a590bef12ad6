"""Optimizer: optax AdamW with open_clip's semantics, weight-decay masks, lr schedule."""
