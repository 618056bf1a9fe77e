"""Causal multi-head self-attention with rotary position embeddings (RoPE).

Shape legend: B batch, L length, D d_model, N heads, H head dim (N * H = D unless the
model was compacted after head pruning).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from sparse_jax.params import weight


def rope(x: jax.Array, theta: float = 10_000.0) -> jax.Array:
  """Rotate channel pairs (i, i + H/2) by position-dependent angles. x [B, L, N, H]."""
  l, h = x.shape[1], x.shape[-1]
  freq = theta ** (-jnp.arange(0, h // 2, dtype=jnp.float32) / (h // 2))   # [H/2]
  angle = jnp.arange(l, dtype=jnp.float32)[:, None] * freq                # [L, H/2]
  cos, sin = jnp.cos(angle)[None, :, None, :], jnp.sin(angle)[None, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


class Attention(nnx.Module):
  """x [B, L, D] -> [B, L, D]. Heads are split over the mesh axis 'model'."""

  def __init__(self, d_model: int, num_heads: int, *, head_dim: int | None = None,
               init_scale: float = 1.0, param_dtype=jnp.float32, mesh: Mesh | None = None,
               rngs: nnx.Rngs):
    head_dim = head_dim or d_model // num_heads
    if head_dim % 2 or (head_dim == d_model // num_heads and d_model % num_heads):
      raise ValueError(f'd_model={d_model} must be num_heads={num_heads} times an even '
                       'head dimension (RoPE rotates channel pairs).')
    self.num_heads = num_heads
    inner = num_heads * head_dim
    kw = dict(init_scale=init_scale, dtype=param_dtype, mesh=mesh)
    # Separate q, k, v kernels so a 'model' split of their output axis splits heads.
    self.wq, self.wk, self.wv = (
        weight(rngs.params(), (d_model, inner), names=(None, 'model'), **kw)
        for _ in range(3))
    self.wo = weight(rngs.params(), (inner, d_model), names=('model', None), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, l, d = x.shape
    q, k, v = (jnp.einsum('bld,dk->blk', x, w[...]).reshape(b, l, self.num_heads, -1)
               for w in (self.wq, self.wk, self.wv))                    # [B, L, N, H]
    out = jax.nn.dot_product_attention(rope(q), rope(k), v, is_causal=True)
    return jnp.einsum('blk,kd->bld', out.reshape(b, l, -1), self.wo[...])
