"""Conversion between PyTorch (timm / open_clip) state_dicts and Flax variables."""
