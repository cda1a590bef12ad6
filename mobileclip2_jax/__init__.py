"""mobileclip2_jax: MobileCLIP / MobileCLIP2 in JAX/Flax, built for TPU/GPU pods.

The open_clip-style API::

    import mobileclip2_jax
    mobileclip2_jax.list_models()
    model, _, preprocess = mobileclip2_jax.create_model_and_transforms("MobileCLIP2-S0", pretrained=path)
    tokenizer = mobileclip2_jax.get_tokenizer("MobileCLIP2-S0")
    model = model.reparameterize()
    image_features = model.encode_image(preprocess.batch([image]))
    text_features = model.encode_text(tokenizer(["a dog", "a cat"]))
"""
__version__ = "0.1.0"

from mobileclip2_jax.factory import (create_model, create_model_and_transforms, get_tokenizer,  # noqa: F401,E402
                                     list_models, load_torch_checkpoint)
