"""Dynamic sparse training (pure): drop-and-grow topology updates at a fixed budget.

SET (Mocanu et al. 2018) regrows at random, RigL (Evci et al. 2020) where |grad| is
largest; SRigL (Lasby et al. 2024) keeps the same number of inputs for every output
neuron (constant fan-in), which a condensed layer (condensed.py) can exploit.

Shape legend: R rows with a budget each, U candidates per row. A leaf [in, out] or
stacked experts [E, in, out] is viewed as rows by `fan_in`:
  'any'       one row per kernel: [1, in*out], or [E, in*out] (each expert its own budget)
  'constant'  one row per output neuron: [out, in], or [E*out, in]
A row keeps K = U - zeros entries; every update drops the n = round(f(t)*K) active entries
of smallest |w| and grows n among the entries inactive after the drop (a just-dropped
entry may win back its place and keeps its value, as RigL's reference does by default).

Neuron ablation (SRigL, constant fan-in): the N output neurons of a layer (a kernel, or one
expert) share the budget B = N*K. At each update a weight is salient if it is among the
layer's top n_keep by |w| or its top n by |grad| (n = round(f(t) * active), n_keep =
active - n); a neuron with fewer than max(1, floor(min_salient * K)) salient weights is
ablated (all its inputs pruned) and the others share B: K' = B // kept (kept = neurons
kept), so a layer holds between B - kept + 1 and B weights. At least ceil(B / U) + 1 neurons stay (the
threshold drops to the count of the one ranked there), so K' <= U. An ablated neuron
comes back when enough of its entries turn salient by gradient.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from sparse_jax.pruning import masking as mask_lib

REGROW = ('random', 'gradient')
FAN_IN = ('any', 'constant')


def drop_fraction(step, *, alpha: float, start_step: int, end_step: int):
  """alpha/2 * (1 + cos(pi * t / T_end)), t = step - start_step, T_end = end - start."""
  t = (jnp.asarray(step, jnp.float32) - start_step) / (end_step - start_step)
  return alpha / 2 * (1 + jnp.cos(jnp.pi * jnp.clip(t, 0.0, 1.0)))


def rows_shape(shape, fan_in: str) -> tuple[int, int]:
  """[R, U] of a kernel [in, out] or [E, in, out] (see the module docstring)."""
  experts, (d_in, d_out) = math.prod(shape[:-2]), shape[-2:]
  return (experts * d_out, d_in) if fan_in == 'constant' else (experts, d_in * d_out)


def to_rows(x, fan_in: str):
  """x [..., in, out] -> [R, U]."""
  if fan_in == 'constant':
    return jnp.swapaxes(x, -1, -2).reshape(-1, x.shape[-2])
  return x.reshape(math.prod(x.shape[:-2]), -1)


def from_rows(rows, shape, fan_in: str):
  """Inverse of to_rows: [R, U] -> [..., in, out] of `shape`."""
  if fan_in == 'constant':
    return jnp.swapaxes(rows.reshape(tuple(shape[:-2]) + (shape[-1], shape[-2])), -1, -2)
  return rows.reshape(shape)


def drop_and_grow(active, magnitude, grow_score, num_zeros, num_swap):
  """One topology update of rows that end with `num_zeros` zeros each.

  active bool[R, U], magnitude and grow_score f32[R, U]; num_zeros, num_swap: int, or i32[]
  / i32[R] per row. A row drops its num_swap active entries of smallest magnitude (and
  more, down to U - num_zeros, when its budget shrank), then grows the entries of highest
  grow score among those inactive after the drop until it holds U - num_zeros. Returns
  (new_active, grown): grown marks the entries active now and not before.
  """
  u = active.shape[-1]
  target = u - jnp.asarray(num_zeros)
  keep = jnp.minimum(active.sum(-1) - num_swap, target)
  # Inactive entries score -inf, so they go first and the smallest active ones follow.
  after_drop = mask_lib.prune_lowest(jnp.where(active, magnitude, -jnp.inf), u - keep)
  # Keep the highest grow scores, all among the entries inactive after the drop.
  grow = mask_lib.prune_lowest(jnp.where(after_drop, -jnp.inf, grow_score),
                               u - (target - keep))
  new = after_drop | grow
  return new, new & ~active


def ablate(active, magnitude, grow_score, num_zeros: int, frac, min_salient: float):
  """Zeros per neuron after SRigL's neuron ablation (see the module docstring).

  active bool[L, N, U] (L layers of N neurons with U inputs, each layer's budget
  N * (U - num_zeros)), magnitude and grow_score f32[L, N, U], frac: this update's drop
  fraction. Returns i32[L, N]: U for an ablated neuron, else U - K' of its layer.
  """
  layers, n, u = active.shape
  budget = n * (u - num_zeros)
  count = active.sum((1, 2))                                              # [L]
  n_move = jnp.round(frac * count).astype(jnp.int32)
  flat = lambda x: x.reshape(layers, n * u)
  by_weight = mask_lib.prune_lowest(flat(jnp.where(active, magnitude, -jnp.inf)),
                                    n * u - (count - n_move))
  by_grad = mask_lib.prune_lowest(flat(grow_score), n * u - n_move)
  salient = (by_weight | by_grad).reshape(layers, n, u).sum(-1)         # [L, N]
  threshold = jnp.full((layers,), max(1, math.floor(min_salient * (u - num_zeros))))
  must_keep = -(-budget // u)                                            # ceil(B / U)
  if must_keep < n:
    ranked = -jnp.sort(-salient, axis=-1)
    threshold = jnp.minimum(threshold, ranked[:, must_keep])
  else:                                                                  # every neuron needed
    threshold = jnp.zeros_like(threshold)
  alive = salient >= threshold[:, None]
  fan_in = budget // alive.sum(-1)
  return jnp.where(alive, u - fan_in[:, None], u).astype(jnp.int32)


def grow_scores(regrow: str, grads, key):
  """|grad| (RigL) or fresh uniform noise from `key` (SET), shaped like grads."""
  if regrow == 'gradient':
    return jnp.abs(grads.astype(jnp.float32))
  if regrow == 'random':
    return jax.random.uniform(key, grads.shape, jnp.float32)
  raise ValueError(f'regrow={regrow!r} is unknown; use one of {REGROW}.')
