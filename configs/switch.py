"""Switch Transformer: top-1 routing, 8 experts, capacity factor 1.25, MoE in every other
block, 0.1x init scale (Fedus et al. 2021). Same active FLOPs per token as configs/dense.py."""
from sparse_jax.config import base_config


def get_config():
  c = base_config()
  c.moe.num_experts = 8
  c.moe.k = 1
  c.moe.capacity_factor = 1.25
  c.moe.moe_every = 2
  c.moe.moe_offset = 1
  c.model.init_scale = 0.1
  return c
