"""Dense baseline: the base model (every FFN dense)."""
from sparse_jax.config import base_config


def get_config():
  return base_config()
