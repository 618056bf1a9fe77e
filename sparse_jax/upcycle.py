"""Sparse upcycling (Komatsuzaki et al. 2022): start an MoE model from a trained dense one.

Every expert of an MoE block starts as a copy of that block's dense FFN (optionally with a
little noise so the copies can drift apart); attention, norms and embeddings are copied;
routers are fresh, at their own small init scale (the experts' scale is irrelevant: they
are overwritten). A shared expert starts with wo = 0, so it adds nothing until it trains.
With normalize_weights=True (K=1 weight 1, or any K renormalised), capacity for every
token and no noise, the upcycled model computes exactly the dense model's function.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from sparse_jax.config import ModelSpec
from sparse_jax.models import TransformerLM, relayout
from sparse_jax.moe import MoE


def upcycle(dense: TransformerLM, spec: ModelSpec, *, mesh: Mesh | None = None,
            noise: float = 0.0, router_init_scale: float = 0.01,
            seed: int = 0) -> TransformerLM:
  """Build the MoE model of `spec` from `dense` (a TransformerLM with dense FFNs), each in
  either layer layout.

  noise: each expert copy gets w + noise * std(w) * N(0, 1), independently per expert.
  router_init_scale: the fresh routers' init scale (small: near-uniform routing).
  """
  dense = relayout(dense, False)
  blocks = list(dense.blocks)
  if any(isinstance(b.ffn, MoE) for b in blocks):
    raise ValueError('upcycle() needs a dense model: its blocks already hold MoE layers.')
  if spec.moe is None:
    raise ValueError('upcycle() needs an MoE spec (moe.num_experts > 0).')
  dense_d_ff = blocks[0].ffn.wi[...].shape[1]
  if spec.moe.d_ff != dense_d_ff or len(blocks) != spec.num_layers:
    raise ValueError(f'upcycle() copies the dense FFN into each expert, so the expert width '
                     f'({spec.moe.d_ff}) must equal the dense d_ff ({dense_d_ff}) and the '
                     f'layer counts must match ({spec.num_layers} vs {len(blocks)}).')
  spec = dataclasses.replace(
      spec, moe=dataclasses.replace(spec.moe, router_init_scale=router_init_scale))
  model = TransformerLM(dataclasses.replace(spec, scan_layers=False), mesh=mesh,
                        rngs=nnx.Rngs(seed))
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
    elif 'shared' in path and path[-1] == 'wo':           # the shared expert adds 0
      value = jnp.zeros_like(var[...])
    else:                                                 # routers, shared wi: fresh
      continue
    if value.shape != var[...].shape:
      raise ValueError(f'upcycle(): {"/".join(map(str, path))} has shape {value.shape} in '
                       f'the dense model but {var[...].shape} in the MoE spec.')
    var[...] = jax.device_put(value.astype(var[...].dtype), var[...].sharding)
  return relayout(model, spec.scan_layers)
