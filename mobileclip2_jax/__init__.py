"""mobileclip2_jax: MobileCLIP / MobileCLIP2 in JAX/Flax, built for TPU/GPU pods."""
__version__ = "0.1.0"
