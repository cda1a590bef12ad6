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

# Lazy: Grain data workers import ``mobileclip2_jax.data.*``, which imports this package first;
# importing JAX (and building its backends) in every worker would cost seconds and memory for
# nothing. The public API resolves on first attribute access instead.
_LAZY_API = ("create_model", "create_model_and_transforms", "get_tokenizer", "list_models",
             "load_torch_checkpoint")
__all__ = list(_LAZY_API)


def __getattr__(name: str):
    if name in _LAZY_API:
        from mobileclip2_jax import factory
        return getattr(factory, name)
    raise AttributeError(f"module 'mobileclip2_jax' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY_API))
