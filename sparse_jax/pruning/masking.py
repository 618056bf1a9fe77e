"""Exact-count masks from scores (pure jnp). True = keep, False = pruned.

Shape legend: R rows pruned independently, U candidates (units) per row, M group size of N:M.
Ties are broken by index: among equal scores the lower index is pruned first, so a mask
is a deterministic function of its scores.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def check_finite(name: str, **arrays) -> None:
  """ValueError naming `name` when a concrete array holds NaN or Inf: a score cannot rank
  them (a NaN sorts as the largest, so it would be kept). Traced arrays pass unchecked
  (under jit the values are unknown; in training the loss guard stops a NaN weight)."""
  for what, a in arrays.items():
    if a is None or isinstance(a, jax.core.Tracer):
      continue
    bad = int(np.size(a) - np.count_nonzero(np.isfinite(np.asarray(a, np.float32))))
    if bad:
      raise ValueError(f'{name}: {what} hold {bad} non-finite value(s) (NaN or Inf) that '
                       'pruning cannot rank; prune a model that computes finite values (a '
                       'checkpoint from before it diverged) or fix the calibration data')


def prune_lowest(scores, num_pruned):
  """scores f32[R, U], num_pruned int (scalar or i32[R]) -> bool[R, U].

  Each row loses exactly its `num_pruned` lowest scores.
  """
  r, g = scores.shape
  order = jnp.argsort(scores, axis=-1, stable=True)                      # [R, U]
  rank = jnp.zeros_like(order).at[jnp.arange(r)[:, None], order].set(
      jnp.arange(g, dtype=order.dtype))                                   # inverse permutation
  return rank >= jnp.reshape(jnp.asarray(num_pruned), (-1, 1))


def sparsity_mask(scores, sparsity: float):
  """Any-shape scores -> bool mask of that shape with round(sparsity * size) False."""
  k = round(sparsity * scores.size)
  return prune_lowest(scores.reshape(1, -1), k).reshape(scores.shape)


def input_axis(ndim: int) -> int:
  """The contraction axis of a kernel: 0 of [in, out], -2 of stacked [E, in, out]."""
  return 0 if ndim < 2 else ndim - 2


def to_n_m_groups(x, m: int):
  """x [..., in, out] -> [size / M, M]: runs of M consecutive entries along the input axis."""
  return jnp.moveaxis(x, input_axis(x.ndim), -1).reshape(-1, m)


def from_n_m_groups(keep, shape):
  """Inverse of to_n_m_groups: bool[size / M, M] -> bool[shape]."""
  ax = input_axis(len(shape))
  moved = list(shape)
  moved.append(moved.pop(ax))
  return jnp.moveaxis(keep.reshape(moved), -1, ax)


def n_m_mask(scores, n: int, m: int):
  """Keep the N largest of every M consecutive scores along the input axis.

  scores [in, out] or [E, in, out] with `in` divisible by M -> bool of the same shape.
  """
  return from_n_m_groups(prune_lowest(to_n_m_groups(scores, m), m - n), scores.shape)
