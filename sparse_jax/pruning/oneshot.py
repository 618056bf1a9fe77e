"""One-shot pruning of one linear layer from calibration data (pure jnp, jit-able).

    w_pruned, mask = oneshot.magnitude(w, sparsity=0.5)
    w_pruned, mask = oneshot.wanda(w, x, n_m=(2, 4))
    w_pruned, mask = oneshot.sparsegpt(w, x, sparsity=0.5, block_size=128, damp=0.01)

Shape legend: w [in, out] (the project's kernel layout, y = x @ w), x [N, in] calibration
inputs (rows = tokens). The papers write W [out, in]: a row of their W is a column of ours.
mask is bool [in, out], True = kept; pruned entries of w_pruned are exactly 0.

Exactly one of `sparsity` (fraction of zeros in [0, 1)) and `n_m=(N, M)` (at most N
non-zeros in every M consecutive entries along `in`, for every output column) is given;
both, like `block_size` and `damp`, are static Python values. Ties are broken by index
(masking.prune_lowest: among equal scores the lower index is pruned first).
"""
from __future__ import annotations

import math
import operator
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from sparse_jax.pruning.masking import check_finite, n_m_mask, prune_lowest

# f32 matmuls on GPU/TPU default to reduced precision (TF32 / bf16 passes); H and the
# error propagation feed a Cholesky and accumulate over the whole layer, so keep them exact.
_HI = lax.Precision.HIGHEST


# ---- validation (static: runs at trace time, one-line errors) -------------------------

def _check(w, x, sparsity, n_m, x_required: bool):
  """Validates the common arguments; returns n_m as a tuple of ints (or None)."""
  if jnp.ndim(w) != 2:
    raise ValueError(f'w has shape {jnp.shape(w)}; pass one 2-D kernel [in, out].')
  check_finite('one-shot pruning', weights=w, **{'calibration inputs': x})
  d_in = w.shape[0]
  if x is None:
    if x_required:
      raise ValueError('x=None; pass calibration inputs x [N, in] (rows = tokens).')
  elif jnp.ndim(x) != 2 or x.shape[1] != d_in:
    raise ValueError(f'x has shape {jnp.shape(x)} but w is {tuple(w.shape)} [in, out]; '
                     f'pass x as [N, {d_in}].')
  if (sparsity is None) == (n_m is None):
    raise ValueError(f'sparsity={sparsity!r} and n_m={n_m!r}; give exactly one of them.')
  if sparsity is not None:
    if not 0 <= sparsity < 1:
      raise ValueError(f'sparsity={sparsity!r} is outside [0, 1); pass the fraction of '
                       'zeros, e.g. 0.5.')
    return None
  try:
    n, m = (int(v) for v in n_m)
  except (TypeError, ValueError):
    raise ValueError(f'n_m={n_m!r} is not a pair of ints; pass n_m=(N, M), e.g. (2, 4).'
                     ) from None
  if not 1 <= n < m:
    raise ValueError(f'n_m={n_m!r} needs 1 <= N < M; pass e.g. n_m=(2, 4).')
  if d_in % m:
    raise ValueError(f'n_m={n_m!r}: the in axis ({d_in}) is not divisible by M={m}; '
                     'pick an M that divides it.')
  return n, m


def _compute_dtype(*arrays):
  """f32, or f64 when jax_enable_x64 is on (the default float); never below f32."""
  return jnp.promote_types(jnp.result_type(*arrays), jnp.result_type(float))


def _count(sparsity, size: int):
  """round(sparsity * size) as an i32 array (0 under N:M, where it is unused)."""
  return jnp.asarray(0 if sparsity is None else round(float(sparsity) * size), jnp.int32)


def _per_column_mask(scores, num_pruned):
  """scores [in, out] -> bool [in, out]: each output column loses its num_pruned lowest."""
  return prune_lowest(scores.T, num_pruned).T


# ---- magnitude and Wanda --------------------------------------------------------------

def magnitude(w, x=None, *, sparsity=None, n_m=None):
  """Magnitude pruning, the usual one-shot baseline: keep the largest |w|.

  Unstructured sparsity is layer-wise: exactly round(sparsity * w.size) zeros over the whole
  matrix (columns may end with different counts), as in the standard one-shot baseline the
  Wanda and SparseGPT papers compare against. N:M picks the N largest |w| of every M-group
  along `in` per column. x is ignored (accepted so all three share a signature) but is
  checked when given.
  """
  n_m = _check(w, x, sparsity, n_m, x_required=False)
  return _magnitude(w, _count(sparsity, w.size), n_m=n_m)


@partial(jax.jit, static_argnames=('n_m',))
def _magnitude(w, k, *, n_m):
  """k i32[]: zeros over the whole matrix (a traced count: one compile for all sparsities)."""
  score = jnp.abs(w.astype(_compute_dtype(w)))                           # [in, out]
  if n_m is None:
    mask = prune_lowest(score.reshape(1, -1), k).reshape(w.shape)        # flat index ties
  else:
    mask = n_m_mask(score, *n_m)
  return jnp.where(mask, w, jnp.zeros_like(w)), mask


def wanda(w, x, *, sparsity=None, n_m=None):
  """Wanda (Sun et al. 2024, "A Simple and Effective Pruning Approach for LLMs").

  Score |w_ij| * ||x_:,i||_2 (the L2 norm of input feature i over the calibration rows),
  compared per output (each column of w, i.e. each row of the paper's W): unstructured
  sparsity s prunes exactly round(s * in) entries of every column; N:M keeps the N best of
  every M-group along `in`. No weight update: w_pruned = w * mask.
  """
  n_m = _check(w, x, sparsity, n_m, x_required=True)
  return _wanda(w, x, _count(sparsity, w.shape[0]), n_m=n_m)


@partial(jax.jit, static_argnames=('n_m',))
def _wanda(w, x, k, *, n_m):
  """k i32[]: zeros per output column."""
  dt = _compute_dtype(w, x)
  norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(dt)), axis=0))            # [in]
  score = jnp.abs(w.astype(dt)) * norm[:, None]                          # [in, out]
  mask = _per_column_mask(score, k) if n_m is None else n_m_mask(score, *n_m)
  return jnp.where(mask, w, jnp.zeros_like(w)), mask


# ---- SparseGPT ------------------------------------------------------------------------

def _hinv_upper(h):
  """h [in, in] SPD -> U upper triangular with U^T U = h^-1 (the upper Cholesky of h^-1).

  With J the reversal permutation and L = chol(J h J): h^-1 = (J L^-T J)(J L^-1 J), and
  J L^-1 J is upper triangular with a positive diagonal, so it is the factor. One Cholesky
  and one triangular solve instead of inverting h and factorising again (better in f32).
  """
  flip = h[::-1, ::-1]
  low = jnp.linalg.cholesky(flip)
  low_inv = jax.scipy.linalg.solve_triangular(
      low, jnp.eye(h.shape[0], dtype=h.dtype), lower=True)
  return low_inv[::-1, ::-1]


def _block_quotas(d_in: int, block: int, sparsity: float) -> tuple:
  """Zeros per output in each block: round(s * end) - round(s * start).

  Cumulative rounding spreads round(s * in) zeros over the blocks in proportion to their
  size and telescopes, so every column ends with exactly round(s * in) zeros.
  """
  return tuple(round(sparsity * min(i + block, d_in)) - round(sparsity * i)
               for i in range(0, d_in, block))


@partial(jax.jit, static_argnames=('block', 'n_m'))
def _sparsegpt(w, x, quotas, damp, *, block, n_m):
  """Core of sparsegpt() in our layout: rows of w [in, out] are the paper's columns.

  quotas i32[blocks]: zeros per column in each block (unstructured; ignored for N:M).
  """
  d_in, d_out = w.shape
  dt = _compute_dtype(w, x)
  w = w.astype(dt)
  x = x.astype(dt)
  h = jnp.matmul(x.T, x, precision=_HI)                                   # [in, in]
  # Dead inputs (never non-zero in the calibration data) carry no information: as in the
  # reference, H_ii = 1 keeps H invertible and their weights are zeroed.
  dead = jnp.diag(h) == 0                                                 # [in]
  h = h + jnp.diag(dead.astype(dt))
  w = jnp.where(dead[:, None], 0, w)
  h = h + damp.astype(dt) * jnp.mean(jnp.diag(h)) * jnp.eye(d_in, dtype=dt)
  u = _hinv_upper(h)                                                      # [in, in] upper

  # Pad `in` to whole blocks so one lax.scan runs them all (compile time independent of
  # the block count). Pad rows: w = 0 and H = I there, so U = diag(U_h, I), they get no
  # error and send none; their saliency is +inf so they never take a pruning quota.
  n_blocks = -(-d_in // block)
  pad = n_blocks * block - d_in
  w = jnp.pad(w, ((0, pad), (0, 0)))                                      # [in_p, out]
  u = jnp.pad(u, ((0, pad), (0, pad))) + jnp.diag(
      jnp.arange(d_in + pad) >= d_in).astype(dt)                          # [in_p, in_p]
  real = jnp.arange(d_in + pad) < d_in                                    # [in_p]
  group = 1 if n_m is None else n_m[1]

  def run_block(w, b):
    i1 = b * block
    w1 = lax.dynamic_slice_in_dim(w, i1, block)                           # [B, out]
    u_rows = lax.dynamic_slice_in_dim(u, i1, block)                       # [B, in_p]
    u1 = lax.dynamic_slice_in_dim(u_rows, i1, block, axis=1)              # [B, B]
    d1 = jnp.diag(u1)                                                     # [B]
    if n_m is None:
      # Unstructured: the whole block's mask from its saliencies at block start (weights
      # as updated by earlier blocks), with a per-output quota (see _block_quotas).
      sal = jnp.square(w1 / d1[:, None])
      sal = jnp.where(lax.dynamic_slice_in_dim(real, i1, block)[:, None], sal, jnp.inf)
      keep1 = _per_column_mask(sal, quotas[b])
    else:
      keep1 = jnp.ones((block, d_out), bool)

    def step(t, carry):
      w1, q1, e1, keep1 = carry
      s = t * group
      if n_m is not None:
        # N:M: choose this M-group from the weights as updated so far (all earlier rows'
        # errors are already in w1: blocks are M-aligned, see sparsegpt()).
        n, m = n_m
        rows = lax.dynamic_slice_in_dim(w1, s, m)                         # [M, out]
        dg = lax.dynamic_slice_in_dim(d1, s, m)                           # [M]
        keep_g = _per_column_mask(jnp.square(rows / dg[:, None]), m - n)
        keep1 = lax.dynamic_update_slice_in_dim(keep1, keep_g, s, 0)
      for r in range(group):                                              # static, small
        j = s + r
        row = w1[j]                                                       # [out]
        q = jnp.where(keep1[j], row, 0)
        err = (row - q) / u1[j, j]                                        # [out]
        # OBS update of the rest of the block. u1 is upper triangular, so u1[j, k] = 0 for
        # k < j: the outer product leaves done rows alone (row j itself is taken from q1).
        w1 = w1 - jnp.outer(u1[j], err)
        q1 = q1.at[j].set(q)
        e1 = e1.at[j].set(err)
      return w1, q1, e1, keep1

    zeros = jnp.zeros_like(w1)
    _, q1, e1, keep1 = lax.fori_loop(0, block // group, step, (w1, zeros, zeros, keep1))
    # Lazy batch update: the block's errors reach all later rows in one matmul. U's rows of
    # this block are 0 left of it, so earlier rows are untouched; its own rows become q1.
    w = w - jnp.matmul(u_rows.T, e1, precision=_HI)
    w = lax.dynamic_update_slice_in_dim(w, q1, i1, 0)
    return w, keep1

  w, keep = lax.scan(run_block, w, jnp.arange(n_blocks))                  # keep [nb, B, out]
  return w[:d_in], keep.reshape(-1, d_out)[:d_in]


def sparsegpt(w, x, *, sparsity=None, n_m=None, block_size=128, damp=0.01):
  """SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be
  Accurately Pruned in One-Shot"): OBS pruning with reconstruction of the kept weights.

  H = x^T x + damp * mean(diag(H)) * I (dead inputs, all-zero columns of x: H_ii = 1 and
  their rows of w_pruned are zeroed, as in the reference; the mask may still mark them kept),
  U = upper Cholesky factor of H^-1. The `in` axis is processed in blocks of block_size
  rows of w (columns of the paper's W); for every row i of a block, with q_i = w_i masked,
  err = (w_i - q_i) / U_ii and each later row j of the block gets w_j -= err * U_ij; after
  the block its errors are propagated to all later rows at once (W[later] -= U[block,
  later]^T @ Err). Saliency is w^2 / U_ii^2, compared per output column.

  Mask selection:
    * unstructured: at the start of each block, every output column prunes its lowest
      block saliencies (weights as updated by the earlier blocks), with a per-block quota
      round(s * block_end) - round(s * block_start). The quotas sum to exactly
      round(s * in) zeros per column. (The reference instead thresholds the block's
      saliencies over all outputs together, so per-output counts drift; this keeps them
      exact and reduces to a per-column choice when block_size >= in.)
    * N:M: at every M-aligned group along `in`, the M - N lowest saliencies computed from
      the current (already updated) weights, as in the reference. block_size is rounded up
      to a multiple of M so no group straddles a block (whose later rows would not yet have
      the block's errors); in exact arithmetic the N:M result does not depend on it.

  Needs a positive definite H: with damp = 0 and fewer calibration rows than inputs the
  Cholesky fails (NaNs). Computes in f32 (f64 under jax_enable_x64); returns w's dtype.
  """
  n_m = _check(w, x, sparsity, n_m, x_required=True)
  try:
    block_size = operator.index(block_size)
  except TypeError:
    raise ValueError(f'block_size={block_size!r}; pass a positive int, e.g. 128.') from None
  if block_size < 1:
    raise ValueError(f'block_size={block_size!r}; pass a positive int, e.g. 128.')
  if not damp >= 0:
    raise ValueError(f'damp={damp!r} is negative; pass a fraction of mean(diag(H)) >= 0, '
                     'e.g. 0.01.')
  d_in = w.shape[0]
  if n_m is None:
    block = min(block_size, d_in)
    quotas = _block_quotas(d_in, block, float(sparsity))
  else:
    block = min(math.ceil(block_size / n_m[1]) * n_m[1], d_in)
    quotas = (0,)
  w_pruned, mask = _sparsegpt(w, x, jnp.asarray(quotas, jnp.int32), jnp.asarray(damp),
                              block=block, n_m=n_m)
  return w_pruned.astype(w.dtype), mask
