"""Grouped matmul and grouped FFN: rows sorted by expert, each group against its own weights.

Shape legend: N rows, E experts (groups), D and F the contracted and produced widths.

  grouped_matmul(x [N, D], w [E, D, F], group_sizes i32[E]) -> [N, F]
    rows group_sizes[0] first use w[0], the next group_sizes[1] use w[1], ...;
    rows past sum(group_sizes) are 0.
  grouped_ffn(w {name: [E, ...]}, x [N, D], group_sizes, activation) -> [N, D]
    the FFN rule (layers.ffn) on each group's rows with its expert's weights; rows past
    sum(group_sizes) are 0. The dropless paths' expert computation. keep_hidden: whether
    the backward reads the pre-activations [N, F] saved by the forward or recomputes
    them (below).

Two implementations of each:

  'blocked'     a loop over each expert's rows in windows of 8, 4, 2 and 1 times
                `block_size` rows: plain [window, D] x [D, F] matmuls each, and for the
                FFN the activation and the output matmul in the same window. The work,
                elementwise included, is the rows plus at most block_size - 1 per expert,
                whatever N is: the buffers the expert-parallel transports receive hold
                many empty rows, which cost nothing here. Forward and backward are loops
                of plain matmuls (custom VJP: no scatter, deterministic), which XLA:CPU
                runs at close to the speed of one large matmul
                (experiments/bench_moe_layer.py). The backward recomputes the
                pre-activations unless asked to keep them (keep_hidden): keeping them
                saves one matmul of seven where the buffer's rows are mostly filled (one
                device's sorted choices), but fills and carries an [N, F] residual,
                which costs more than the matmul where most rows are empty (a
                transport's receive buffer: measured slower there).
  'ragged_dot'  jax.lax.ragged_dot, the accelerators' grouped-matmul primitive (the FFN:
                layers.ffn with it as the matmul). XLA:CPU has no fast kernel for it
                (about 8x a dense matmul of the same FLOPs).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sparse_jax.layers import activate, ffn, ffn_weight_names
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
  return _blocked(*_same_axes(x, (w,), None, group_sizes), block_size, None, False)


def grouped_ffn(w: dict[str, jax.Array], x: jax.Array, group_sizes: jax.Array, *,
                activation: str, impl: str = 'blocked', block_size: int = 64,
                keep_hidden: bool = False) -> jax.Array:
  """layers.ffn per group: x [N, D] sorted by group, w {wi, [wi_gate,] wo: [E, ...]},
  group_sizes i32[E] -> [N, D] in x's dtype. keep_hidden: 'blocked' saves the
  pre-activations for the backward (for buffers with few empty rows; 'ragged_dot' always
  does, as autodiff of layers.ffn)."""
  if impl == 'ragged_dot':
    return ffn(w, x, activation, matmul=lambda x, w: jax.lax.ragged_dot(x, w, group_sizes))
  w_in = tuple(w[n] for n in ffn_weight_names(activation) if n != 'wo')
  return _blocked(*_same_axes(x, w_in, w['wo'], group_sizes), block_size, activation,
                  keep_hidden)


def _same_axes(x, w_in, w_out, group_sizes):
  """Inside shard_map all operands must vary over the same mesh axes, so that the loop
  carries type-check and the weights' cotangents (summed over the others by pcast's
  transpose) keep the weights' types."""
  arrays = (x, *w_in, group_sizes) + (() if w_out is None else (w_out,))
  axes = frozenset().union(*(varying_axes(a) for a in arrays))
  v = lambda a: None if a is None else vary(a, axes)
  return v(x), tuple(map(v, w_in)), v(w_out), v(group_sizes).astype(jnp.int32)


def _zeros(shape, dtype, like):
  """Zeros varying over the mesh axes `like` varies over (a loop carry must match)."""
  return vary(jnp.zeros(shape, dtype), varying_axes(like))


# ---------------------------------------------------------------------------- blocked

def _window_sizes(block: int, n: int) -> tuple[int, ...]:
  """Window sizes, largest first: 8, 4, 2 and 1 times block, none larger than half the
  n rows there are. A group's rows go through as many of the largest windows as fit,
  then at most one of each smaller size (few, large matmuls), and one last masked
  window of the smallest size (at most that size - 1 wasted rows per group).

  A window of all n rows would be the whole buffer, the same in every iteration, and
  XLA's while-loop invariant code motion (jax 0.10.2; no upstream issue tracks it)
  hoists such matmuls out of their loop, so they ran on every row of the buffer even
  when no group had a row (tests/test_dropless.py checks the compiled module)."""
  cap = max(1, n // 2)
  return tuple(sorted({min(block << j, cap) for j in range(4)}, reverse=True))


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

  def last(i, c):
    # + i (always 0): a window that does not depend on the loop index would be hoisted
    # out of this loop of 0 or 1 iterations and computed for empty groups too.
    where = jnp.minimum(start + i, n_rows - size)
    rows = where + jnp.arange(size)
    return body(c, where, size, ((rows >= start) & (rows < end))[:, None])

  return jax.lax.fori_loop(0, (end > start).astype(jnp.int32), last, carry)


def _for_each_window(x, group_sizes, block, per_group, body, carry):
  """fori over groups e: args = per_group(e); then body(carry, args, where, size, mine)
  over the windows of e's rows (_fold_group)."""
  n, sizes, ends = x.shape[0], _window_sizes(block, x.shape[0]), jnp.cumsum(group_sizes)

  def group(e, carry):
    args = per_group(e)
    return _fold_group(ends[e] - group_sizes[e], ends[e], n, sizes,
                       lambda c, where, size, mine: body(c, e, args, where, size, mine), carry)

  return jax.lax.fori_loop(0, group_sizes.shape[0], group, carry)


def _rows(a, where, size):
  return jax.lax.dynamic_slice_in_dim(a, where, size, 0)


def _put(a, value, where, mine):
  """a with rows [where, where + size) set to value, only where `mine` (None: all)."""
  if mine is not None:
    value = jnp.where(mine, value, _rows(a, where, value.shape[0]))
  return jax.lax.dynamic_update_slice_in_dim(a, value, where, 0)


def _dot(a, b, contract_b=0):
  """a [n, K] contracted with b's axis contract_b (0: a @ b; 1: a @ b.T, the transpose
  folded into the contraction, which XLA:CPU does faster than a transposed copy)."""
  return jax.lax.dot_general(a, b, (((1,), (contract_b,)), ((), ())))


def _expert(w_in, w_out, e, dtype):
  cast = lambda w: w[e].astype(dtype)                  # once per group, not once per window
  return tuple(map(cast, w_in)), None if w_out is None else cast(w_out)


def _add_at(a, e, value):
  """a[e] += value, as a slice update (in place in the loop) rather than a scatter."""
  return jax.lax.dynamic_update_index_in_dim(
      a, jax.lax.dynamic_index_in_dim(a, e, 0, keepdims=False) + value, e, 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _blocked(x, w_in, w_out, group_sizes, block, activation, keep_hidden):
  """x @ w_in[0] per group (activation None: w_out is None), or the FFN
  activate(x @ w_in...) @ w_out per group. Residuals: the inputs, and with keep_hidden
  the pre-activations x @ w_in [N, F] of the FFN."""
  return _forward(x, w_in, w_out, group_sizes, block, activation, False)[0]


def _forward(x, w_in, w_out, group_sizes, block, activation, keep_hidden):
  """(out [N, F or D], pre-activations ([N, F], ...) if kept else ())."""
  ffn_ = w_out is not None

  def body(carry, e, weights, where, size, mine):
    out, hidden = carry
    wi, wo = weights
    p = tuple(_dot(_rows(x, where, size), w) for w in wi)
    hidden = tuple(_put(h, q, where, mine) for h, q in zip(hidden, p))
    y = _dot(activate(activation, *p), wo) if ffn_ else p[0]
    return _put(out, y, where, mine), hidden

  out = _zeros((x.shape[0], (w_out if ffn_ else w_in[0]).shape[-1]), x.dtype, x)
  hidden = tuple(_zeros((x.shape[0], w.shape[-1]), x.dtype, x)
                 for w in w_in) if keep_hidden and ffn_ else ()
  return _for_each_window(x, group_sizes, block, lambda e: _expert(w_in, w_out, e, x.dtype),
                          body, (out, hidden))


def _blocked_fwd(x, w_in, w_out, group_sizes, block, activation, keep_hidden):
  out, hidden = _forward(x, w_in, w_out, group_sizes, block, activation, keep_hidden)
  return out, (x, w_in, w_out, group_sizes, hidden)


def _blocked_bwd(block, activation, keep_hidden, res, dy):
  x, w_in, w_out, group_sizes, hidden = res
  ffn_ = w_out is not None
  dy = dy.astype(x.dtype)
  xt = x.T           # [D, N]: XLA:CPU contracts [D, rows] @ [rows, F] faster than x^T dy
  f32 = lambda shape: _zeros(shape, jnp.float32, x)

  def body(carry, e, weights, where, size, mine):
    dx, d_in, d_out = carry
    wi, wo = weights
    g = _rows(dy, where, size)
    if mine is not None:
      g = jnp.where(mine, g, 0)
    if ffn_:
      pre = (tuple(_rows(h, where, size) for h in hidden) if hidden else
             tuple(_dot(_rows(x, where, size), w) for w in wi))
      h, act_vjp = jax.vjp(lambda *p: activate(activation, *p), *pre)
      d_out = _add_at(d_out, e, jax.lax.dot_general(
          h, g, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32))
      dp = act_vjp(_dot(g, wo, 1))
    else:
      dp = (g,)
    dx = _put(dx, sum(_dot(d, w, 1) for d, w in zip(dp, wi)), where, mine)
    xb = jax.lax.dynamic_slice_in_dim(xt, where, size, 1)
    d_in = tuple(_add_at(a, e, jnp.matmul(xb, d, preferred_element_type=jnp.float32))
                 for a, d in zip(d_in, dp))
    return dx, d_in, d_out

  carry = (_zeros(x.shape, x.dtype, x), tuple(f32(w.shape) for w in w_in),
           f32(w_out.shape) if ffn_ else None)
  dx, d_in, d_out = _for_each_window(x, group_sizes, block,
                                     lambda e: _expert(w_in, w_out, e, x.dtype), body, carry)
  return (dx, tuple(d.astype(w.dtype) for d, w in zip(d_in, w_in)),
          d_out.astype(w_out.dtype) if ffn_ else None, None)


_blocked.defvjp(_blocked_fwd, _blocked_bwd)
