"""Sparse upcycling (Komatsuzaki et al. 2022): start an MoE model from a trained dense one.

Every expert of an MoE block starts as a copy of that block's dense FFN (optionally with a
little noise so the copies can drift apart); attention, norms and embeddings are copied;
routers are fresh with a small init. With K=1 and normalize_weights=True (weight 1) or
any K with renormalised weights, and capacity for every token, the upcycled model
computes exactly the dense model's function at initialisation.
"""
from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from sparse_jax.models import TransformerLM
from sparse_jax.moe import MoE


def upcycle(dense: TransformerLM, config, *, mesh: Mesh | None = None, noise: float = 0.0,
            router_init_scale: float = 0.01, seed: int = 0) -> TransformerLM:
  """Build the MoE model of `config` from `dense` (a TransformerLM with dense FFNs).

  noise: each expert copy gets w + noise * std(w) * N(0, 1), independently per expert.
  """
  blocks = [b for b in dense.blocks]
  if any(isinstance(b.ffn, MoE) for b in blocks):
    raise ValueError('upcycle() needs a dense model: its blocks already hold MoE layers.')
  moe_d_ff = config.moe.d_ff or config.model.d_ff
  dense_d_ff = blocks[0].ffn.wi[...].shape[1]
  if moe_d_ff != dense_d_ff or len(blocks) != config.model.num_layers:
    raise ValueError(f'upcycle() copies the dense FFN into each expert, so the expert width '
                     f'({moe_d_ff}) must equal the dense d_ff ({dense_d_ff}) and the layer '
                     f'counts must match ({config.model.num_layers} vs {len(blocks)}).')
  cfg = copy.deepcopy(config)
  cfg.moe.init_scale = router_init_scale     # routers: the only fresh weights that count
  model = TransformerLM(cfg.model, cfg.moe, mesh=mesh, rngs=nnx.Rngs(seed))
  src = dict(nnx.to_flat_state(nnx.state(dense, nnx.Param)))
  key = jax.random.key(seed + 1)
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if path in src:                                       # same place, same role
      value = src[path][...]
    elif 'experts' in path:                               # blocks.i.ffn.experts.wi -> ffn.wi
      w = src[tuple(p for p in path if p != 'experts')][...]
      e = var[...].shape[0]
      value = jnp.broadcast_to(w, (e,) + w.shape)
      if noise:
        key, sub = jax.random.split(key)
        value = value + noise * jnp.std(w) * jax.random.normal(sub, value.shape, w.dtype)
    else:                                                 # routers stay freshly initialised
      continue
    if value.shape != var[...].shape:
      raise ValueError(f'upcycle(): {"/".join(map(str, path))} has shape {value.shape} in '
                       f'the dense model but {var[...].shape} in the MoE config.')
    var[...] = jax.device_put(value.astype(var[...].dtype), var[...].sharding)
  return model
