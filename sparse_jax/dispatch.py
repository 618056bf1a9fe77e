"""Dispatch and combine backends over a RoutingPlan: pure functions.

Shape legend: G groups, S tokens per group, K choices per token, E experts, C capacity,
D d_model, N = S*K routed rows (dropless).

Capacity backends share one signature and one slot layout, expert-major [E, G*C, D]
(so expert parallelism splits the buffer along E with no transpose):

  dispatch(x [G, S, D], plan [G, S, K], num_experts, capacity) -> (slots [E, G*C, D], ctx)
  combine(out [E, G*C, D], plan, ctx) -> y [G, S, D]       (a single group: drop the G)

  'index'    gathers tokens into slots and back, summing over K. Forward and backward
             are gathers only (custom VJPs): deterministic, fast on CPU, memory linear
             in S.
  'einsum'   GShard one-hot dispatch/combine tensors [G, S, E, C]: the readable
             reference, quadratic in S (C grows with S).

'dropless' has no capacity and no slots: it sorts the S*K choices by expert and runs a
grouped matmul (jax.lax.ragged_dot).
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
def _gather_to_slots(x, m: SlotMap):
  """x [S, D] -> slots [E*C, D]."""
  return _take_rows(x, m.src, m.filled)


def _gather_to_slots_fwd(x, m):
  return _gather_to_slots(x, m), m


def _gather_to_slots_bwd(m, d_slots):
  # Transpose of the gather: each token sums the gradients of the slots it fed.
  dx = jnp.sum(_take_rows(d_slots, m.dest, m.kept), axis=1)        # [S, K, D] -> [S, D]
  return dx, None


_gather_to_slots.defvjp(_gather_to_slots_fwd, _gather_to_slots_bwd)


@jax.custom_vjp
def _gather_from_slots(out, weight, m: SlotMap):
  """out [E*C, D], weight f32[S, K] -> y [S, D] = sum_k weight * out[dest]."""
  rows = _take_rows(out, m.dest, m.kept)                           # [S, K, D]
  return _weighted_sum(rows, weight)


def _gather_from_slots_fwd(out, weight, m):
  return _gather_from_slots(out, weight, m), (out, weight, m)


def _gather_from_slots_bwd(res, dy):
  out, weight, m = res
  # Work in slot space: one gather of dy rows serves both cotangents.
  dy_rows = _take_rows(dy, m.src, m.filled)                        # [E*C, D]
  slot_weight = weight.reshape(-1)[m.choice].astype(dy.dtype)      # [E*C]
  d_out = dy_rows * slot_weight[:, None]
  slot_dot = jnp.sum(dy_rows * out, axis=-1)                       # <dy[s], out[slot]>
  d_weight = jnp.where(m.kept, slot_dot[m.dest], 0).astype(weight.dtype)   # [S, K]
  return d_out, d_weight, None


_gather_from_slots.defvjp(_gather_from_slots_fwd, _gather_from_slots_bwd)


def index_dispatch(x: jax.Array, plan: RoutingPlan, num_experts: int,
                   capacity: int) -> tuple[jax.Array, SlotMap]:
  """x [S, D] -> slots [E, C, D]; or G groups x [G, S, D] -> slots [E, G*C, D].

  Returns the SlotMap for the combine too. Empty slots are zero rows.
  """
  m = slot_map(plan, num_experts, capacity)
  d = x.shape[-1]
  return _gather_to_slots(x.reshape(-1, d), m).reshape(num_experts, -1, d), m


def index_combine(out: jax.Array, plan: RoutingPlan, m: SlotMap) -> jax.Array:
  """out [E, C, D] -> y [S, D] (or [E, G*C, D] -> [G, S, D]): each token's kept
  choices, weighted and summed."""
  d = out.shape[-1]
  y = _gather_from_slots(out.reshape(-1, d), plan.weight.reshape(m.dest.shape), m)
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


def einsum_dispatch(x, plan, num_experts, capacity):
  """x [G, S, D] (or [S, D]) -> (slots [E, G*C, D], combine tensor [G, S, E, C])."""
  dispatch, combine = einsum_masks(plan, num_experts, capacity)
  d = x.shape[-1]
  xg, dispatch = x.reshape((-1,) + x.shape[-2:]), dispatch.reshape((-1,) + dispatch.shape[-3:])
  slots = jnp.einsum('gsec,gsd->egcd', dispatch.astype(x.dtype), xg)
  return slots.reshape(num_experts, -1, d), combine


def einsum_combine(out, plan, combine):
  """out [E, G*C, D], combine [G, S, E, C] -> y [G, S, D] (or [S, D] for one group)."""
  e, _, d = out.shape
  cg = combine.reshape((-1,) + combine.shape[-3:])                          # [G, S, E, C]
  g, _, _, c = cg.shape
  y = jnp.einsum('gsec,egcd->gsd', cg.astype(out.dtype), out.reshape(e, g, c, d))
  return y.reshape(plan.weight.shape[:-1] + (d,))


class Backend(NamedTuple):
  """A capacity backend: the dispatch and combine halves (signatures above)."""
  dispatch: Callable
  combine: Callable


CAPACITY_BACKENDS = {'index': Backend(index_dispatch, index_combine),
                     'einsum': Backend(einsum_dispatch, einsum_combine)}
BACKENDS = (*CAPACITY_BACKENDS, 'dropless')


# --------------------------------------------------------------------------- dropless

def dropless(x: jax.Array, plan: RoutingPlan, num_experts: int,
             ragged_ffn: Callable[[jax.Array, jax.Array], jax.Array]) -> jax.Array:
  """Every choice is computed: sort rows by expert, ragged matmuls, unsort, combine.

  x [S, D]; ragged_ffn(rows [N, D], group_sizes i32[E]) -> [N, D] with rows sorted by
  expert. The plan's weights are used as they are (route with capacity >= S).
  """
  s, k = plan.expert.shape
  flat_expert = plan.expert.reshape(-1)                                # [N], N = S*K
  order = jnp.argsort(flat_expert, stable=True)
  group_sizes = jnp.bincount(flat_expert, length=num_experts).astype(jnp.int32)
  rows = ragged_ffn(x[order // k], group_sizes)                        # [N, D] sorted
  inverse = jnp.argsort(order)
  rows = rows[inverse].reshape(s, k, -1)                               # [S, K, D]
  return _weighted_sum(rows, plan.weight)
