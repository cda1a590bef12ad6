"""ViT towers vs timm (as open_clip builds them for MobileCLIP2-B and -L-14)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import randomize_torch_model, requires_torch, timm, torch
from mobileclip2_jax.convert.vit_layout import vit_from_torch, vit_to_torch
from mobileclip2_jax.models.vit import VIT_CONFIGS, ViT


@requires_torch
@pytest.mark.parametrize("timm_name,cfg_name", [("vit_base_mci_224", "vit_b16_mci"),
                                                ("vit_base_mci_224", "vit_b16_mci_apple"),
                                                ("vit_large_patch14_clip_224", "vit_l14")])
def test_vit_matches_timm(timm_name, cfg_name):
    cfg = VIT_CONFIGS[cfg_name]
    torch.manual_seed(0)
    model = timm.create_model(timm_name, num_classes=cfg.embed_dim, global_pool="token").eval()
    if cfg_name == "vit_b16_mci_apple":
        # Apple's v1 vit_b16 = timm's with stem padding 1 and LayerNorm eps 1e-5 (architecture.md §2.3).
        model.patch_embed.backbone[0].conv.padding = (1, 1)
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.eps = 1e-5
    randomize_torch_model(model, seed=1)
    with torch.no_grad():
        model.pos_embed.normal_(0, 0.1)
        model.cls_token.normal_(0, 0.1)
    assert sum(p.numel() for p in model.parameters()) == sum(
        int(np.prod(v.shape)) for v in jax.tree.leaves(jax.eval_shape(
            ViT(cfg).init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))["params"]))
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(x).numpy()
    sd = {"visual.trunk." + k: v for k, v in model.state_dict().items()}
    variables = vit_from_torch(sd, cfg)
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(jax.jit(ViT(cfg).apply)(variables, jnp.asarray(x.numpy().transpose(0, 2, 3, 1))))
    assert np.abs(ours - ref).max() <= 1e-5 * np.abs(ref).max()
    back = vit_to_torch(variables, cfg)
    assert set(back) == set(model.state_dict())
    for k, v in model.state_dict().items():
        assert np.array_equal(back[k], v.numpy()), k


def test_vit_rejects_wrong_image_size():
    with pytest.raises(ValueError, match=r"expected images of shape \(batch, 224, 224, 3\)"):
        jax.eval_shape(ViT(VIT_CONFIGS["vit_b16_mci"]).init, jax.random.key(0), jnp.zeros((1, 256, 256, 3)))
