"""Grouped matmul: rows sorted by expert, each group against its own weight matrix.

Shape legend: N rows, E experts (groups), D and F the contracted and produced widths.

  grouped_matmul(x [N, D], w [E, D, F], group_sizes i32[E]) -> [N, F]
    rows group_sizes[0] first use w[0], the next group_sizes[1] use w[1], ...;
    rows past sum(group_sizes) are 0.

Two implementations of the same function:

  'blocked'     a loop over each expert's rows in windows of 8, 4, 2 and 1 times
                `block_size` rows: a plain [window, D] x [D, F] matmul each. The work is
                the rows plus at most block_size - 1 per expert. Forward and backward are
                loops of plain matmuls (custom VJP: no scatter, deterministic), which
                XLA:CPU runs at close to the speed of one large matmul
                (experiments/bench_moe_layer.py).
  'ragged_dot'  jax.lax.ragged_dot, the accelerators' grouped-matmul primitive. XLA:CPU
                has no fast kernel for it (about 8x a dense matmul of the same FLOPs).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sparse_jax.sharding import vary, varying_axes

GROUPED_MATMULS = ('blocked', 'ragged_dot')


def default_grouped_matmul() -> str:
  """'blocked' on XLA:CPU (measured, experiments/bench_moe_layer.py); 'ragged_dot' on
  accelerators, which have kernels for it."""
  return 'blocked' if jax.default_backend() == 'cpu' else 'ragged_dot'


def check_grouped_matmul(impl: str, block_size: int) -> None:
  if impl not in GROUPED_MATMULS:
    raise ValueError(f'grouped_matmul={impl!r} is unknown; use one of {GROUPED_MATMULS}.')
  if not (isinstance(block_size, int) and block_size >= 1):
    raise ValueError(f'block_size={block_size!r} must be a positive integer (rows per '
                     'window of the blocked grouped matmul; default 64).')


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *,
                   impl: str = 'blocked', block_size: int = 64) -> jax.Array:
  """x [N, D] sorted by group, w [E, D, F], group_sizes i32[E] -> [N, F] in x's dtype."""
  if impl == 'ragged_dot':
    return jax.lax.ragged_dot(x, w, group_sizes)
  # Inside shard_map all operands must vary over the same mesh axes, so that the loop
  # carries type-check and w's cotangent (summed over the others by pcast's transpose)
  # keeps w's type.
  axes = varying_axes(x) | varying_axes(w) | varying_axes(group_sizes)
  x, w, group_sizes = (vary(a, axes) for a in (x, w, group_sizes))
  return _blocked(x, w, group_sizes.astype(jnp.int32), block_size)


def _zeros(shape, dtype, like):
  """Zeros varying over the mesh axes `like` varies over (a loop carry must match)."""
  return vary(jnp.zeros(shape, dtype), varying_axes(like))


# ---------------------------------------------------------------------------- blocked

def _window_sizes(block: int, n: int) -> tuple[int, ...]:
  """Window sizes, largest first: 8, 4, 2 and 1 times block, none larger than the n rows
  there are. A group's rows go through as many 8-block windows as fit, then at most one
  of each smaller size (few, large matmuls), and one last masked block-row window (at
  most block - 1 wasted rows per group)."""
  return tuple(sorted({min(block << j, n) for j in range(4)}, reverse=True))


def _fold_group(start, end, n_rows, sizes, body, carry):
  """Fold body(carry, where, size, mine) over windows covering rows [start, end) of an
  array of n_rows rows.

  Whole windows of each size, largest first, with mine=None; then, if rows are left,
  one window of the smallest size whose rows past `end` (another group's) must be left
  alone: `mine` bool[size, 1] marks the group's rows, and `where` is moved back if the
  window would leave the array (mine accounts for that)."""
  for size in sizes:
    count = (end - start) // size
    carry = jax.lax.fori_loop(
        0, count, lambda i, c, size=size, r0=start: body(c, r0 + i * size, size, None),
        carry)
    start = start + count * size
  size = sizes[-1]

  def last(_, c):
    where = jnp.minimum(start, n_rows - size)
    rows = where + jnp.arange(size)
    return body(c, where, size, ((rows >= start) & (rows < end))[:, None])

  return jax.lax.fori_loop(0, (end > start).astype(jnp.int32), last, carry)


def _rows(a, where, size):
  return jax.lax.dynamic_slice_in_dim(a, where, size, 0)


def _per_group_matmul(x, w, group_sizes, block, *, transpose_w=False):
  """out[rows of group e] = x[rows] @ w[e] (or @ w[e].T); rows past sum(group_sizes)
  stay 0. The transpose is folded into the contraction (a transposed copy of w costs
  XLA:CPU more than the matmul saves)."""
  n, sizes, ends = x.shape[0], _window_sizes(block, x.shape[0]), jnp.cumsum(group_sizes)
  contract = (((1,), (1 if transpose_w else 0,)), ((), ()))

  def per_group(e, out):
    we = w[e].astype(x.dtype)                  # once per group, not once per window

    def body(out, where, size, mine):
      y = jax.lax.dot_general(_rows(x, where, size), we, contract)
      if mine is not None:
        y = jnp.where(mine, y, _rows(out, where, size))
      return jax.lax.dynamic_update_slice_in_dim(out, y, where, 0)

    return _fold_group(ends[e] - group_sizes[e], ends[e], n, sizes, body, out)

  out = _zeros((n, w.shape[1 if transpose_w else 2]), x.dtype, x)
  return jax.lax.fori_loop(0, group_sizes.shape[0], per_group, out)


def _per_group_outer(x, dy, group_sizes, block):
  """dw[e] = x[rows of e]^T dy[rows of e] in float32: x [N, D], dy [N, F] -> [E, D, F]."""
  n, sizes, ends = x.shape[0], _window_sizes(block, x.shape[0]), jnp.cumsum(group_sizes)

  xt = x.T           # [D, N]: XLA:CPU contracts [D, rows] @ [rows, F] faster than x^T dy

  def body(acc, where, size, mine):
    xb, gb = jax.lax.dynamic_slice_in_dim(xt, where, size, 1), _rows(dy, where, size)
    if mine is not None:
      gb = jnp.where(mine, gb, 0)
    return acc + jnp.matmul(xb, gb, preferred_element_type=jnp.float32)

  def per_group(e, dw):
    acc = _fold_group(ends[e] - group_sizes[e], ends[e], n, sizes, body,
                      _zeros(dw.shape[1:], jnp.float32, x))
    return dw.at[e].set(acc)

  dw = _zeros((group_sizes.shape[0], x.shape[1], dy.shape[1]), jnp.float32, x)
  return jax.lax.fori_loop(0, group_sizes.shape[0], per_group, dw)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blocked(x, w, group_sizes, block):
  return _per_group_matmul(x, w, group_sizes, block)


def _blocked_fwd(x, w, group_sizes, block):
  return _blocked(x, w, group_sizes, block), (x, w, group_sizes)


def _blocked_bwd(block, res, dy):
  x, w, group_sizes = res
  dy = dy.astype(x.dtype)
  dx = _per_group_matmul(dy, w, group_sizes, block, transpose_w=True)
  dw = _per_group_outer(x, dy, group_sizes, block)
  return dx, dw.astype(w.dtype), None


_blocked.defvjp(_blocked_fwd, _blocked_bwd)
