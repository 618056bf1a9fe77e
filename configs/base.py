"""Base config: a small byte-level decoder LM on the embedded corpus, dense FFNs.

Override any key from the command line, e.g.
  python -m sparse_jax.train --config=configs/base.py --workdir=runs/x --config.train.steps=100
The defaults and their meaning: sparse_jax/config.py (base_config).
"""
from sparse_jax.config import base_config


def get_config():
  return base_config()
