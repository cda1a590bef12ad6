"""Orbax checkpoints: model exports (``pretrained``); training-state checkpoints follow."""
