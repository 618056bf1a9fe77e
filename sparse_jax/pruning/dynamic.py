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


def drop_and_grow(active, magnitude, grow_score, num_zeros: int, num_swap):
  """One topology update of rows with `num_zeros` zeros each.

  active bool[R, U] (exactly num_zeros False per row), magnitude and grow_score f32[R, U],
  num_swap: int or i32[], the entries to move per row (at most U - num_zeros). Returns
  (new_active, grown): new_active has num_zeros False per row again; grown marks the
  entries active now and not before.
  """
  # Inactive entries score -inf, so they go first and the n smallest active ones follow.
  after_drop = mask_lib.prune_lowest(jnp.where(active, magnitude, -jnp.inf),
                                     num_zeros + num_swap)
  # Keep the n highest grow scores, all among the entries inactive after the drop.
  grow = mask_lib.prune_lowest(jnp.where(after_drop, -jnp.inf, grow_score),
                               active.shape[-1] - num_swap)
  new = after_drop | grow
  return new, new & ~active


def grow_scores(regrow: str, grads, key):
  """|grad| (RigL) or fresh uniform noise from `key` (SET), shaped like grads."""
  if regrow == 'gradient':
    return jnp.abs(grads.astype(jnp.float32))
  if regrow == 'random':
    return jax.random.uniform(key, grads.shape, jnp.float32)
  raise ValueError(f'regrow={regrow!r} is unknown; use one of {REGROW}.')
