"""The key/value cache of a generating model: where new tokens go and what they may see.

Shape legend: B batch, L new tokens per row, T cache slots (the static maximum length).

Every row writes the same slots: a prompt batch is left-padded to one length, so slot t
holds column t of every row; row b's real tokens start at slot start[b] (the padding
before it is never attended to) and its RoPE position is t - start[b]. A layer's cache is
a dict of [B, T, ...] arrays (Attention: 'k', 'v'; LatentAttention: 'latent', 'k_rope');
the model's cache is the list of its blocks' caches.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Step(NamedTuple):
  """Where a cached call's L new tokens sit. slot i32[]: the slot of the first (the same
  for every row); start i32[B]: each row's first real slot."""
  slot: jax.Array
  start: jax.Array

  def positions(self, l: int) -> jax.Array:
    """i32[B, L]: the RoPE positions of the new tokens (negative on left padding)."""
    return self.slot + jnp.arange(l)[None, :] - self.start[:, None]

  def mask(self, l: int, t: int) -> jax.Array:
    """bool[B, 1, L, T]: query i sees the real slots up to its own. A padding query sees
    only itself, so no row of scores is empty and padding stays finite."""
    q = self.slot + jnp.arange(l)[:, None]                              # [L, 1]
    k = jnp.arange(t)[None, :]                                          # [1, T]
    real = k[None] >= self.start[:, None, None]                        # [B, 1, T]
    return ((k <= q)[None] & real | (k == q)[None])[:, None]


def write(buf: jax.Array, new: jax.Array, slot: jax.Array) -> jax.Array:
  """buf [B, T, ...] with new [B, L, ...] written at slots slot .. slot + L - 1."""
  return jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), slot, axis=1)
