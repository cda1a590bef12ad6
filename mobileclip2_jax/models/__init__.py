"""Flax modules of the MobileCLIP towers."""
from mobileclip2_jax.models.mci import MCi, MCiConfig, MCI_CONFIGS, get_mci_config  # noqa: F401
from mobileclip2_jax.models.reparam import reparameterize  # noqa: F401
