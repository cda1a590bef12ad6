"""mobileclip2_jax: MobileCLIP / MobileCLIP2 in JAX/Flax.

The JAX stack is pinned to versions that resolve and were tested together (Python 3.11).
The ``torch`` extra pins the PyTorch reference so that pip can never pull a CUDA build:
``torchvision==0.28.0`` requires exactly ``torch==2.13.0``, whose CPU wheel is what this
project's machines install. That torchvision is itself a CUDA build whose C extension cannot
load beside CPU torch; ``mobileclip2_jax.convert.torch_env.ensure_torchvision_importable``
registers the missing operator schemas so timm/open_clip import (way (a) of
``shared/docs/environment.md`` §2; way (b), torch 2.14.1 + torchvision 0.29.1, costs ~5.5 GB).
"""
from setuptools import find_packages, setup

JAX_STACK = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "tensorflow-datasets==4.9.10",
    "array_record==0.8.6",
    "sentencepiece==0.2.3",
    "ml_collections==1.1.0",
    "numpy==2.4.6",
    "pillow==13.0.0",
    "ftfy==6.3.1",        # CLIP BPE text cleaning, as open_clip
    "regex==2026.11.19",  # CLIP BPE word splitting (\p{L} classes)
    "safetensors==0.8.0",  # open_clip .safetensors checkpoints, read without torch
]

TORCH_REFERENCE = [
    "torch==2.13.0",
    "torchvision==0.28.0",
    "timm==1.0.31",
    "open_clip_torch==3.3.0",
]

setup(
    name="mobileclip2_jax",
    version="0.1.0",
    description="MobileCLIP / MobileCLIP2 in JAX/Flax with PyTorch parity",
    python_requires="==3.11.*",
    packages=find_packages(include=["mobileclip2_jax", "mobileclip2_jax.*"]),
    # The CLIP BPE merges file (from open_clip, MIT) and its licence notice.
    package_data={"mobileclip2_jax.tokenizers": ["bpe_simple_vocab_16e6.txt.gz", "LICENSE.open_clip"]},
    install_requires=JAX_STACK,
    extras_require={
        "torch": TORCH_REFERENCE,
        "test": ["pytest==9.2.0"],
    },
)
