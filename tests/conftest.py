"""Shared test set-up.

- The PyTorch reference (timm, open_clip) needs the torchvision shim before first import.
- absl flags are marked parsed so Grain worker processes can start inside pytest.
- Parity tests that need torch are skipped only where the torch extra is not installed.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

try:
    from absl import flags
    flags.FLAGS.mark_as_parsed()
except Exception:  # absl is a dependency of the JAX stack; tolerate its absence in tooling
    pass

try:
    from mobileclip2_jax.convert.torch_env import import_timm
    timm = import_timm()
    import torch
    HAVE_TORCH = True
except ImportError:
    torch = timm = None
    HAVE_TORCH = False

requires_torch = pytest.mark.skipif(not HAVE_TORCH, reason="torch extra not installed")


def randomize_torch_model(model, seed: int = 0, gamma_range=(0.05, 0.2), var_range=(0.5, 1.5)):
    """Randomizes BN/LN affine params and running stats and the layer scales of a torch model.

    Layer scales are raised from their 1e-5 init so that every block contributes to the
    output (with 1e-5 a broken block would hide below the tolerance), but kept small enough
    that float32 rounding is not amplified chaotically through 40+ residual blocks.
    """
    g = torch.Generator().manual_seed(seed)

    def u(t, lo, hi):
        t.copy_(torch.rand(t.shape, generator=g) * (hi - lo) + lo)

    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.copy_(torch.randn(mod.running_mean.shape, generator=g) * 0.1)
                u(mod.running_var, *var_range)
                u(mod.weight, 0.5, 1.5)
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.1)
            elif isinstance(mod, torch.nn.LayerNorm):
                u(mod.weight, 0.5, 1.5)
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.1)
        for name, p in model.named_parameters():
            if name.endswith("gamma") or name.endswith("layer_scale"):
                u(p, *gamma_range)
    return model


def release_compiled_programs():
    """Drops JAX's compiled executables (and our per-architecture encoder caches) and collects.

    One pytest process compiles every variant's towers, teachers and losses; kept alive, those
    executables pushed the suite's peak RSS to ~23 GB, at the edge of CI's 24 GiB.
    """
    import gc
    import jax
    try:
        from mobileclip2_jax import clip_model, factory
        clip_model._jitted_encoder.cache_clear()
        factory._jitted_init.cache_clear()
    except (ImportError, AttributeError):
        pass
    jax.clear_caches()
    gc.collect()


@pytest.fixture(autouse=True, scope="module")
def _release_after_each_module():
    yield
    release_compiled_programs()
