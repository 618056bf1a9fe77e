"""Dispatch and combine backends over one RoutingPlan: pure functions for one group.

Shape legend: S tokens in the group, K choices per token, E experts, C capacity,
D d_model, N = S*K routed rows (dropless). Layers vmap these over groups G.

  'index'    gather tokens into [E, C, D] slots, run experts, gather back and sum over
             K. Forward and backward are gathers only (custom VJPs), so the result is
             deterministic and fast on CPU, and memory is linear in S.
  'einsum'   GShard one-hot dispatch/combine tensors [S, E, C]: the readable reference,
             quadratic in S (C grows with S).
  'dropless' sort the S*K choices by expert and run jax.lax.ragged_dot; no capacity.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from sparse_jax.routing import RoutingPlan

BACKENDS = ('index', 'einsum', 'dropless')


# ------------------------------------------------------------------------------ index

class SlotMap(NamedTuple):
  """Both directions of the token <-> slot assignment, slots flattened to E*C.

  dest:   i32[S, K]  flat slot e*C + c of each choice (clamped; see kept)
  kept:   bool[S, K]
  src:    i32[E*C]   token feeding each slot (0 where empty)
  choice: i32[E*C]   flat choice index s*K + k feeding each slot (0 where empty)
  filled: bool[E*C]
  """
  dest: jax.Array
  kept: jax.Array
  src: jax.Array
  choice: jax.Array
  filled: jax.Array


def slot_map(plan: RoutingPlan, num_experts: int, capacity: int) -> SlotMap:
  s, k = plan.expert.shape
  n_slots = num_experts * capacity
  dest = plan.expert * capacity + jnp.minimum(plan.slot, capacity - 1)
  # Dropped choices point past the end (each at its own index, so indices stay unique).
  dest = jnp.where(plan.kept, dest, n_slots + jnp.arange(s * k).reshape(s, k))
  # Inverse map by an integer scatter: kept (expert, slot) pairs are unique, so the
  # write order cannot matter; only indices move here, never token vectors.
  choice = jnp.full((n_slots,), -1, jnp.int32).at[dest.reshape(-1)].set(
      jnp.arange(s * k, dtype=jnp.int32), mode='drop', unique_indices=True)
  filled = choice >= 0
  choice = jnp.maximum(choice, 0)
  return SlotMap(dest=jnp.minimum(dest, n_slots - 1), kept=plan.kept,
                 src=choice // k, choice=choice, filled=filled)


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
  return jnp.einsum('skd,sk->sd', rows, weight.astype(out.dtype))


def _gather_from_slots_fwd(out, weight, m):
  return _gather_from_slots(out, weight, m), (out, weight, m)


def _gather_from_slots_bwd(res, dy):
  out, weight, m = res
  slot_weight = weight.reshape(-1)[m.choice].astype(dy.dtype)      # [E*C]
  d_out = _take_rows(dy, m.src, m.filled) * slot_weight[:, None]
  rows = _take_rows(out, m.dest, m.kept)                           # [S, K, D]
  d_weight = jnp.einsum('skd,sd->sk', rows, dy).astype(weight.dtype)
  return d_out, d_weight, None


_gather_from_slots.defvjp(_gather_from_slots_fwd, _gather_from_slots_bwd)


def index_dispatch(x: jax.Array, plan: RoutingPlan, num_experts: int,
                   capacity: int) -> tuple[jax.Array, SlotMap]:
  """x [S, D] -> (slots [E, C, D], SlotMap for the combine). Empty slots are zero."""
  m = slot_map(plan, num_experts, capacity)
  return _gather_to_slots(x, m).reshape(num_experts, capacity, x.shape[-1]), m


def index_combine(out: jax.Array, plan: RoutingPlan, m: SlotMap) -> jax.Array:
  """out [E, C, D] -> y [S, D]: each token's kept choices, weighted and summed."""
  e, c, d = out.shape
  return _gather_from_slots(out.reshape(e * c, d), plan.weight, m)


# ----------------------------------------------------------------------------- einsum

def einsum_masks(plan: RoutingPlan, num_experts: int, capacity: int):
  """One-hot dispatch bool[S, E, C] and combine f32[S, E, C] tensors (GShard)."""
  onehot_e = jax.nn.one_hot(plan.expert, num_experts, dtype=jnp.float32)   # [S, K, E]
  # jax.nn.one_hot gives all zeros for slot >= C, so dropped choices vanish here.
  onehot_c = jax.nn.one_hot(plan.slot, capacity, dtype=jnp.float32)        # [S, K, C]
  onehot_c = onehot_c * plan.kept[..., None]
  dispatch = jnp.einsum('ske,skc->sec', onehot_e, onehot_c)
  combine = jnp.einsum('ske,skc,sk->sec', onehot_e, onehot_c, plan.weight)
  return dispatch, combine


def einsum_dispatch(x, plan, num_experts, capacity):
  """x [S, D] -> (slots [E, C, D], combine tensor [S, E, C])."""
  dispatch, combine = einsum_masks(plan, num_experts, capacity)
  return jnp.einsum('sec,sd->ecd', dispatch.astype(x.dtype), x), combine


def einsum_combine(out, combine):
  """out [E, C, D], combine [S, E, C] -> y [S, D]."""
  return jnp.einsum('sec,ecd->sd', combine.astype(out.dtype), out)


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
  return jnp.einsum('skd,sk->sd', rows, plan.weight.astype(rows.dtype))
