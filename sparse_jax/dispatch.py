"""Dispatch and combine backends over a RoutingPlan: pure functions.

Shape legend: G groups, S tokens per group, K choices per token, E experts, C capacity,
D d_model, N sorted rows (dropless; at most S*K).

Capacity backends share one signature and one slot layout, expert-major [E, G*C, D]
(so expert parallelism splits the buffer along E with no transpose):

  dispatch(x [G, S, D], plan [G, S, K], num_experts, capacity) -> (slots [E, G*C, D], ctx)
  combine(out [E, G*C, D], plan, ctx) -> y [G, S, D]       (a single group: drop the G)

  'index'    gathers tokens into slots and back, summing over K. Forward and backward
             are gathers only (custom VJPs): deterministic, fast on CPU, memory linear
             in S.
  'einsum'   GShard one-hot dispatch/combine tensors [G, S, E, C]: the readable
             reference, quadratic in S (C grows with S). The contractions select rather
             than multiply, so that, as in 'index', a NaN/inf row stays in its own
             slots and tokens (whose rows are non-finite then) instead of reaching its
             whole group.

'dropless' has no capacity: it sorts the S*K choices by expert (sort_map, a SlotMap whose
slots are the sorted rows, so the index backend's gathers move them both ways) and runs
the experts as one grouped matmul (grouped_matmul.py) over the sorted rows.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from sparse_jax.routing import RoutingPlan


# ------------------------------------------------------------------------------ index

class SlotMap(NamedTuple):
  """Both directions of the token <-> slot assignment, with tokens flattened to
  T = G*S and slots to E*G*C in expert-major order [E, G, C].

  dest:   i32[T, K]    flat slot of each choice (clamped; see kept)
  kept:   bool[T, K]
  src:    i32[E*G*C]   flat token feeding each slot (0 where empty)
  choice: i32[E*G*C]   flat choice t*K + k feeding each slot (0 where empty)
  filled: bool[E*G*C]
  """
  dest: jax.Array
  kept: jax.Array
  src: jax.Array
  choice: jax.Array
  filled: jax.Array


def slot_map(plan: RoutingPlan, num_experts: int, capacity: int) -> SlotMap:
  """Index maps for a plan of one group [S, K] or of G groups [G, S, K].

  Groups are handled by offsetting indices rather than by vmap: a vmapped gather
  becomes a batched gather, which costs XLA:CPU ~8% of a whole FFN step.
  """
  as_groups = lambda a: a.reshape((-1,) + a.shape[-2:])               # -> [G, S, K]
  expert, slot, kept = as_groups(plan.expert), as_groups(plan.slot), as_groups(plan.kept)
  g, s, k = expert.shape
  n_slots = num_experts * g * capacity
  group = jnp.arange(g, dtype=jnp.int32)[:, None, None]
  dest = expert * (g * capacity) + group * capacity + jnp.minimum(slot, capacity - 1)
  # Dropped choices point past the end (each at its own index, so indices stay unique).
  dest = jnp.where(kept, dest, n_slots + jnp.arange(g * s * k).reshape(g, s, k))
  dest, kept = dest.reshape(g * s, k), kept.reshape(g * s, k)
  # Inverse map by an integer scatter: kept (expert, group, slot) triples are unique, so
  # the write order cannot matter; only indices move here, never token vectors.
  choice = jnp.full((n_slots,), -1, jnp.int32).at[dest.reshape(-1)].set(
      jnp.arange(g * s * k, dtype=jnp.int32), mode='drop', unique_indices=True)
  filled = choice >= 0
  choice = jnp.maximum(choice, 0)
  return SlotMap(dest=jnp.minimum(dest, n_slots - 1), kept=kept, src=choice // k,
                 choice=choice, filled=filled)


def _weighted_sum(rows, weight):
  """rows [S, K, D], weight [S, K] -> [S, D]. Elementwise on purpose: as an einsum
  ('skd,sk->sd') XLA:CPU runs S batched matrix-vector products, ~30% of a whole FFN."""
  return jnp.sum(rows * weight.astype(rows.dtype)[..., None], axis=1)


def _take_rows(table, idx, mask):
  """table[idx] with rows zeroed where mask is False. [N, D], i32[...] -> [..., D]."""
  return jnp.where(mask[..., None], table[idx], 0).astype(table.dtype)


@jax.custom_vjp
def gather_to_slots(x, m: SlotMap):
  """x [S, D] -> slots [E*C, D] (or any SlotMap's slots): slot i holds x[m.src[i]]."""
  return _take_rows(x, m.src, m.filled)


def _gather_to_slots_fwd(x, m):
  return gather_to_slots(x, m), m


def _gather_to_slots_bwd(m, d_slots):
  # Transpose of the gather: each token sums the gradients of the slots it fed.
  dx = jnp.sum(_take_rows(d_slots, m.dest, m.kept), axis=1)        # [S, K, D] -> [S, D]
  return dx, None


gather_to_slots.defvjp(_gather_to_slots_fwd, _gather_to_slots_bwd)


@jax.custom_vjp
def gather_from_slots(out, weight, m: SlotMap):
  """out [E*C, D] (any SlotMap's slots), weight f32[S, K] -> y [S, D] =
  sum_k weight * out[dest], over kept choices."""
  rows = _take_rows(out, m.dest, m.kept)                           # [S, K, D]
  return _weighted_sum(rows, weight)


def _gather_from_slots_fwd(out, weight, m):
  return gather_from_slots(out, weight, m), (out, weight, m)


def _gather_from_slots_bwd(res, dy):
  out, weight, m = res
  # Work in slot space: one gather of dy rows serves both cotangents.
  dy_rows = _take_rows(dy, m.src, m.filled)                        # [E*C, D]
  slot_weight = weight.reshape(-1)[m.choice].astype(dy.dtype)      # [E*C]
  d_out = dy_rows * slot_weight[:, None]
  slot_dot = jnp.sum(dy_rows * out, axis=-1)                       # <dy[s], out[slot]>
  d_weight = jnp.where(m.kept, slot_dot[m.dest], 0).astype(weight.dtype)   # [S, K]
  return d_out, d_weight, None


gather_from_slots.defvjp(_gather_from_slots_fwd, _gather_from_slots_bwd)


def index_dispatch(x: jax.Array, plan: RoutingPlan, num_experts: int,
                   capacity: int) -> tuple[jax.Array, SlotMap]:
  """x [S, D] -> slots [E, C, D]; or G groups x [G, S, D] -> slots [E, G*C, D].

  Returns the SlotMap for the combine too. Empty slots are zero rows.
  """
  m = slot_map(plan, num_experts, capacity)
  d = x.shape[-1]
  return gather_to_slots(x.reshape(-1, d), m).reshape(num_experts, -1, d), m


def index_combine(out: jax.Array, plan: RoutingPlan, m: SlotMap) -> jax.Array:
  """out [E, C, D] -> y [S, D] (or [E, G*C, D] -> [G, S, D]): each token's kept
  choices, weighted and summed."""
  d = out.shape[-1]
  y = gather_from_slots(out.reshape(-1, d), plan.weight.reshape(m.dest.shape), m)
  return y.reshape(plan.weight.shape[:-1] + (d,))


# ----------------------------------------------------------------------------- einsum

def einsum_masks(plan: RoutingPlan, num_experts: int, capacity: int):
  """One-hot dispatch bool[..., S, E, C] and combine f32[..., S, E, C] tensors (GShard)."""
  onehot_e = jax.nn.one_hot(plan.expert, num_experts, dtype=jnp.float32)   # [., S, K, E]
  # jax.nn.one_hot gives all zeros for slot >= C, so dropped choices vanish here.
  onehot_c = jax.nn.one_hot(plan.slot, capacity, dtype=jnp.float32)        # [., S, K, C]
  onehot_c = onehot_c * plan.kept[..., None]
  dispatch = jnp.einsum('...ske,...skc->...sec', onehot_e, onehot_c)
  combine = jnp.einsum('...ske,...skc,...sk->...sec', onehot_e, onehot_c, plan.weight)
  return dispatch, combine


def _select_sum(spec: str, mask: jax.Array, rows: jax.Array) -> jax.Array:
  """einsum(spec, mask, rows) contracting over source rows, where only the nonzero
  entries of `mask` select a source: a non-finite source row (any NaN/inf) reaches only
  the destinations that select it, as non-finite rows. A plain product would send
  0 * NaN = NaN to every destination of the contraction (the whole group), and its
  gradient would spread the same way; here the other rows' gradients stay finite."""
  finite = jnp.all(jnp.isfinite(rows), axis=-1, keepdims=True)             # [..., 1]
  out = jnp.einsum(spec, mask.astype(rows.dtype), jnp.where(finite, rows, 0))
  hit = jnp.einsum(spec, (mask != 0).astype(jnp.float32), (~finite).astype(jnp.float32))
  # The value they get is computed from the bad rows, not a NaN constant, which XLA:CPU
  # may fold into finite garbage in a fused consumer (exp).
  bad = jnp.sum(jnp.where(finite, 0, rows))
  return jnp.where(hit > 0, bad, out).astype(rows.dtype)


def einsum_dispatch(x, plan, num_experts, capacity):
  """x [G, S, D] (or [S, D]) -> (slots [E, G*C, D], combine tensor [G, S, E, C])."""
  dispatch, combine = einsum_masks(plan, num_experts, capacity)
  d = x.shape[-1]
  xg, dispatch = x.reshape((-1,) + x.shape[-2:]), dispatch.reshape((-1,) + dispatch.shape[-3:])
  slots = _select_sum('gsec,gsd->egcd', dispatch, xg)
  return slots.reshape(num_experts, -1, d), combine


def einsum_combine(out, plan, combine):
  """out [E, G*C, D], combine [G, S, E, C] -> y [G, S, D] (or [S, D] for one group)."""
  e, _, d = out.shape
  cg = combine.reshape((-1,) + combine.shape[-3:])                          # [G, S, E, C]
  g, _, _, c = cg.shape
  y = _select_sum('gsec,egcd->gsd', cg, out.reshape(e, g, c, d))
  return y.reshape(plan.weight.shape[:-1] + (d,))


class Backend(NamedTuple):
  """A capacity backend: the dispatch and combine halves (signatures above)."""
  dispatch: Callable
  combine: Callable


CAPACITY_BACKENDS = {'index': Backend(index_dispatch, index_combine),
                     'einsum': Backend(einsum_dispatch, einsum_combine)}
BACKENDS = (*CAPACITY_BACKENDS, 'dropless')


# --------------------------------------------------------------------------- dropless

def sort_map(key: jax.Array, num_groups: int,
             num_slots: int | None = None) -> tuple[SlotMap, jax.Array]:
  """The choices of S tokens sorted by group, as a SlotMap whose slots are the sorted rows.

  key i32[S, K]: the group (expert) of each choice; a key outside [0, num_groups) marks
  a choice that is not computed. Slot i holds the i-th choice in (group, token, k)
  order, so group g's rows are contiguous; the not-computed choices sort last.
  num_slots N (default S*K) may be smaller when fewer choices can ever be computed; the
  caller guarantees it. Returns the map and group_sizes i32[num_groups].
  """
  s, k = key.shape
  n = s * k if num_slots is None else num_slots
  flat = key.reshape(-1)
  valid = (flat >= 0) & (flat < num_groups)
  order = jnp.argsort(jnp.where(valid, flat, num_groups), stable=True)[:n].astype(jnp.int32)
  # Sorted position of every choice: an integer scatter of a permutation (unique indices).
  position = jnp.full((s * k,), n, jnp.int32).at[order].set(
      jnp.arange(n, dtype=jnp.int32), unique_indices=True)
  kept = (valid & (position < n)).reshape(s, k)
  sizes = jnp.bincount(jnp.where(valid, flat, num_groups), length=num_groups + 1)
  return SlotMap(dest=jnp.minimum(position, n - 1).reshape(s, k), kept=kept,
                 src=order // k, choice=order, filled=valid[order]), \
      sizes[:num_groups].astype(jnp.int32)


def sorted_apply(x: jax.Array, key: jax.Array, weight: jax.Array, num_groups: int,
                 grouped_fn: Callable[[jax.Array, jax.Array], jax.Array],
                 num_slots: int | None = None) -> jax.Array:
  """y[s] = sum_k weight[s, k] * fn_{key[s, k]}(x[s]) over the computed choices.

  x [S, D], key i32[S, K] (see sort_map), weight [S, K];
  grouped_fn(rows [N, D] sorted by group, group_sizes i32[G]) -> [N, D].
  Moving rows is gathers both ways, forward and backward (the index backend's custom
  VJPs): no scatter-add, deterministic.
  """
  m, sizes = sort_map(key, num_groups, num_slots)
  rows = grouped_fn(gather_to_slots(x, m), sizes)                     # [N, D] sorted
  return gather_from_slots(rows, weight.astype(jnp.float32), m)


def dropless(x: jax.Array, plan: RoutingPlan, num_experts: int,
             grouped_fn: Callable[[jax.Array, jax.Array], jax.Array]) -> jax.Array:
  """Every kept choice computed, no capacity: x [S, D], plan [S, K] -> y [S, D].

  Route with a capacity >= S so that only choices of probability 0 are not kept.
  """
  key = jnp.where(plan.kept, plan.expert, num_experts)
  return sorted_apply(x, key, plan.weight, num_experts, grouped_fn)


def chosen_experts(x: jax.Array, plan: RoutingPlan, weights: dict[str, jax.Array],
                   apply: Callable) -> jax.Array:
  """Dropless for a handful of tokens: each kept choice runs its expert's weights,
  gathered, so S tokens read S*K expert matrices, not E. x [S, D], plan [S, K],
  weights {name: [E, ...]}, apply(weights [N, ...], rows [N, 1, D]) -> [N, 1, D] (one
  'expert' per row: Experts.apply) -> y [S, D] = sum_k weight * expert_k(x)."""
  s, k = plan.expert.shape
  picked = {n: w[plan.expert.reshape(-1)] for n, w in weights.items()}      # [S*K, ...]
  rows = jnp.repeat(x, k, axis=0)[:, None]                                # [S*K, 1, D]
  out = apply(picked, rows).reshape(s, k, -1)
  return _weighted_sum(jnp.where(plan.kept[..., None], out, 0), plan.weight)
