"""Data: evaluation preprocessing (per-variant constants); the reinforced-data pipeline follows."""
from mobileclip2_jax.data.preprocess import (ImagePreprocessor, PreprocessConfig,  # noqa: F401
                                             RandomResizedCropPreprocessor)
