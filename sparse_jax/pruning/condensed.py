"""Condensed constant fan-in layers: a sparse kernel stored as the kept inputs of each output.

A constant fan-in mask (SRigL, Lasby et al., ICLR 2024) keeps the same number K of inputs
for every output neuron, so a masked kernel w [in, out] packs into two dense arrays:
values [K, out] (the kept weights) and indices int32 [K, out] (their input rows), and

  y[..., o] = sum_k x[..., indices[k, o]] * values[k, o]      (= x @ (w * mask))

costs K / in of the dense matmul's multiply-adds and reads K / in of its weight bytes
(plus the indices). The masked dense layer pays for its zeros; this one does not.

  values, indices = condense(w, constant_fan_in_mask(w, 0.9))
  y = condensed_matmul(x, values, indices)       # jit-able; equals x @ (w * mask)
  w_masked = expand(values, indices, w.shape[0])

Shape legend: [in, out] a kernel (y = x @ w), [K, out] its condensed form, N rows of x
(leading axes flattened).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_jax.pruning.masking import prune_lowest

# Kept inputs summed per pass over the accumulator (see condensed_matmul). On XLA:CPU
# (jax 0.10.2, 2048x2048 at 80-95% sparsity, 1 to 256 rows, a shared 2-core machine) 8 per
# pass was 1.2-2x faster than 1 per pass, and faster than 16 or 32 (up to 1.8x) and than 4
# at 16 and 256 rows (4 was within noise, sometimes ahead, at 64 rows).
GROUP = 8


def constant_fan_in_mask(w, sparsity: float):
  """w [in, out] -> bool [in, out] pruning the round(sparsity * in) smallest |w| of every
  output column (as pruning.wrap(fan_in='constant') does): the SRigL mask shape that
  condense() needs.

  Ties go by index as in masking.prune_lowest (among equal |w| the lower input row is
  pruned first), so the mask is a deterministic function of w.
  """
  if not 0 <= sparsity <= 1:
    raise ValueError(f'sparsity must be in [0, 1]; got {sparsity}')
  w = jnp.asarray(w)
  if w.ndim != 2:
    raise ValueError(f'constant_fan_in_mask needs a kernel [in, out]; got shape {w.shape}')
  n_in = w.shape[0]
  return _prune_lowest_per_column(w, round(sparsity * n_in))


@functools.partial(jax.jit, static_argnums=1)     # one compile per shape, not one per op
def _prune_lowest_per_column(w, num_pruned: int):
  return prune_lowest(jnp.abs(w).T, num_pruned).T        # rows of prune_lowest = outputs


def condense(w, mask) -> tuple[jax.Array, jax.Array]:
  """Kernel w [in, out] and its bool mask [in, out] with K True in every column, or none
  (a neuron ablated by dynamic sparse training) -> (values [K, out] in w's dtype, indices
  int32 [K, out]), indices ascending per column; an empty column gets K zero values.

  A conversion step on concrete arrays (the counting runs in numpy), not for jit.
  """
  w, mask = np.asarray(w), np.asarray(mask).astype(bool)
  if w.ndim != 2 or mask.shape != w.shape:
    raise ValueError(f'condense needs a kernel [in, out] and a mask of the same shape; got '
                     f'kernel {w.shape} and mask {mask.shape}')
  counts = mask.sum(axis=0)
  live = counts[counts > 0]
  if live.size and live.min() != live.max():
    raise ValueError(f'mask has between {live.min()} and {live.max()} non-zeros per '
                     "output column; condense needs a constant fan-in (e.g. pruning with "
                     "fan_in='constant'; empty columns are fine)")
  k = int(live[0]) if live.size else 0
  # A stable sort of "pruned?" puts each column's kept rows first, in ascending order.
  indices = np.argsort(~mask, axis=0, kind='stable')[:k]
  return (jnp.asarray(np.take_along_axis(np.where(mask, w, 0), indices, axis=0)),
          jnp.asarray(indices, dtype=jnp.int32))


def expand(values, indices, in_features: int) -> jax.Array:
  """(values [K, out], indices [K, out]) -> the dense kernel [in_features, out] that
  condensed_matmul multiplies by: expand(*condense(w, mask), in) == w * mask.

  Entries that share an (input, output) add up, as they do in condensed_matmul.
  """
  n_out = values.shape[1]
  w = jnp.zeros((in_features, n_out), values.dtype)
  return w.at[indices, jnp.arange(n_out)].add(values)


@jax.jit     # one dispatch when called eagerly too: an online (batch-1) call is ~0.2 ms
def condensed_matmul(x, values, indices) -> jax.Array:
  """x [..., in] -> y [..., out] with y[..., o] = sum_k x[..., indices[k, o]] * values[k, o].

  Equals x @ expand(values, indices, in); pure JAX, jit-able and differentiable in x and
  values. indices must lie in [0, in) (out-of-range ones are not checked: XLA clamps).

  How: x is transposed to xt [in, N], so that gathering inputs indices[k] is a gather of
  whole contiguous rows, xt[indices[k]] [out, N]. A loop adds them, scaled by values[k],
  into an accumulator [out, N], GROUP rows per pass: XLA fuses a pass into one loop over
  the accumulator, and the GROUP products are summed pairwise before they join it, which
  keeps the float32 rounding error near the dense matmul's (summing all K in sequence was
  as fast, but at 256 rows its error grew to 3-5x the blocked dense matmul's, and at
  K = 819 the two differed by 1.5e-6 of the output scale).

  One formulation for every N: on XLA:CPU it was the fastest both at one row (online
  inference) and at 8-256 rows. Gathering all of x[..., indices] -> [..., K, out] and
  reducing over K (einsum or sum) was 1.5-2x slower at one row and more than 10x slower at
  64-256 rows; gathering columns of x [N, in] instead of rows of xt matched it at one row
  but was 4-6x slower at 64-256 rows; tiling the outputs into blocks (lax.map), or GROUP
  accumulators over contiguous runs of k, was up to 6x slower; slicing a pass's GROUP rows
  of indices and values as one block, 1.4-1.9x slower at 1-8 rows. Skipping the
  negative-index wrap of jnp indexing (indices are never negative) saved a third at one
  row.
  """
  k, n_out = values.shape
  dtype = jnp.result_type(x, values)
  acc_dtype = jnp.promote_types(dtype, jnp.float32)       # bfloat16 sums in float32
  xt = jnp.reshape(x, (-1, x.shape[-1])).T               # [in, N]

  def term(r):                                            # [out, N]
    rows = xt.at[indices[r]].get(mode='promise_in_bounds', wrap_negative_indices=False)
    return rows.astype(acc_dtype) * values[r].astype(acc_dtype)[:, None]

  def step(p, acc):
    return acc + _pairwise_sum([term(p * GROUP + j) for j in range(GROUP)])

  acc = jnp.zeros((n_out, xt.shape[1]), acc_dtype)
  if k // GROUP:                        # (tracing the body needs K > 0 rows to index)
    acc = jax.lax.fori_loop(0, k // GROUP, step, acc)
  if k % GROUP:                                           # the last k % GROUP kept inputs
    acc = acc + _pairwise_sum([term(r) for r in range(k - k % GROUP, k)])
  return acc.T.reshape(*x.shape[:-1], n_out).astype(dtype)


def _pairwise_sum(terms: list):
  """Sum of a static list of arrays as a balanced tree (error ~ log2(len), not len)."""
  while len(terms) > 1:
    terms = [terms[i] + terms[i + 1] if i + 1 < len(terms) else terms[i]
             for i in range(0, len(terms), 2)]
  return terms[0]


class CondensedLinear(nnx.Module):
  """A constant fan-in sparse linear layer stored condensed: y = condensed_matmul(x, ...).

  values [K, out] are an nnx.Param (they can be fine-tuned); indices [K, out] a plain
  nnx.Variable, so optimizers over nnx.Param leave them alone.
  """

  def __init__(self, values, indices):
    self.values = nnx.Param(jnp.asarray(values))
    self.indices = nnx.Variable(jnp.asarray(indices, dtype=jnp.int32))

  @classmethod
  def from_dense(cls, w, mask) -> 'CondensedLinear':
    """The layer that computes x @ (w * mask); mask needs a constant fan-in (condense)."""
    return cls(*condense(w, mask))

  def __call__(self, x):
    return condensed_matmul(x, self.values[...], self.indices[...])
