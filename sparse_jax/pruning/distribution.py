"""How an overall sparsity is spread over layers (pure; numpy on the host or jnp).

'uniform': every layer at s. 'erk' (Erdos-Renyi-Kernel, Evci et al. 2020, RigL):
density_l = eps * (sum of dims) / (product of dims), eps chosen so the non-zeros add up
to (1 - s) * total; a layer whose density would exceed 1 is kept dense and eps is solved
again over the rest until no layer exceeds 1 (densifying one only raises eps, so the loop
ends after at most one pass per layer).

Stacked experts [E, in, out] use the per-expert kernel shape [in, out] for the ERK ratio
(an expert is a layer of its own size; the E copies do not make it sparser) while the
non-zero budget counts all E * in * out weights.
"""
from __future__ import annotations

import math

import numpy as np

DISTRIBUTIONS = ('uniform', 'erk')


def kernel_shape(shape) -> tuple:
  return tuple(shape[-2:])


def erk_ratio(shape) -> float:
  """(sum of dims) / (product of dims) of the (per-expert) kernel shape."""
  k = kernel_shape(shape)
  return sum(k) / math.prod(k)


def erk_densities(shapes, sparsity, xp=np):
  """Density per layer (1 = dense) for overall `sparsity`. shapes: list of leaf shapes."""
  sizes = xp.asarray([float(math.prod(s)) for s in shapes])
  raw = xp.asarray([erk_ratio(s) for s in shapes])
  budget = (1 - sparsity) * xp.sum(sizes)
  dense = raw < 0                                                      # all False
  eps = 0.0                                                            # no layers
  for _ in range(len(shapes)):
    rest = xp.sum(xp.where(dense, 0.0, raw * sizes))
    eps = (budget - xp.sum(xp.where(dense, sizes, 0.0))) / xp.maximum(rest, 1e-30)
    dense = dense | (eps * raw > 1)
  return xp.where(dense, 1.0, eps * raw)


def zeros_per_layer(sparsity, shapes, distribution: str, xp=np):
  """Weights to prune in each layer: round(s * size), or round((1 - d_l) * size) for ERK."""
  sizes = xp.asarray([math.prod(s) for s in shapes])
  if distribution == 'uniform':
    frac = sparsity
  elif distribution == 'erk':
    frac = 1 - erk_densities(shapes, sparsity, xp)
  else:
    raise ValueError(f'distribution={distribution!r} is unknown; use one of {DISTRIBUTIONS}.')
  return xp.clip(xp.round(frac * sizes), 0, sizes).astype(xp.int32)
