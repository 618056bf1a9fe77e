"""GShard-style top-2: 8 experts, weights renormalised over the two choices, MoE in every
other block. Experts have full width, so each MoE block costs twice a dense FFN."""
import pathlib

from sparse_jax.config import load_config


def get_config():
  c = load_config(pathlib.Path(__file__).with_name('switch.py'))
  c.moe.k = 2
  return c
