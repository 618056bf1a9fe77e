"""Hugging Face checkpoints in and out: load_hf(folder) -> (model, spec); save_hf(model,
spec, folder). Families: families.FAMILIES (one file each); docs/checkpoints.md."""
from sparse_jax.hub.families import FAMILIES
from sparse_jax.hub.loading import HubError, import_config, load_hf
from sparse_jax.hub.saving import save_hf

__all__ = ['FAMILIES', 'HubError', 'import_config', 'load_hf', 'save_hf']
