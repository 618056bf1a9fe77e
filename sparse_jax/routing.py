"""Routing math for one group of tokens: pure functions, no parameters, no sharding.

Shape legend: S tokens in the group, E experts, K experts per token, C capacity
(slots per expert). Router logits are always float32.

Semantics (docs/moe.md, "Routing semantics"):
  * probs = softmax(logits) (or sigmoid(logits), DeepSeek-V3); an optional selection
    bias [E] shifts the scores used to *pick* experts (loss-free balancing) but never the
    combine weights. Group-limited selection (DeepSeek-V3) first keeps the topk_group of
    n_group expert groups with the largest sum of their two best biased scores.
  * K == 1: weight = probs[e] (Switch). K >= 2: weights renormalised over the chosen K
    by default (GShard, Mixtral), before any dropping.
  * Slots are handed out choice-major then token-major: every token's first choice
    before any second choice. A choice whose slot is >= C is dropped (weight 0).
  * A choice whose probability is exactly 0 (softmax underflow, logit gaps past ~100)
    is no request at all: it takes no slot (slot -1), is never kept, has weight 0, and
    counts neither as demand nor as dropped.
  * A token whose softmax is undefined (a NaN or +inf logit, or every logit -inf) gets
    probabilities 0 (router_probs), so it likewise requests nothing and displaces no
    other token. Left to NaN arithmetic its choice would depend on the compiler
    (XLA:CPU's fused exp can turn a NaN into finite garbage).
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp


class RoutingPlan(NamedTuple):
  """Where each token's K choices go. All fields are [S, K].

  expert: i32 expert index of the choice.
  weight: f32 combine weight; 0 where the choice was dropped.
  slot:   i32 position in that expert's queue (priority order). Kept choices have
          slot < C; a dropped choice keeps its queue position (>= C); a choice of
          probability 0 has slot -1.
  kept:   bool, 0 <= slot < C.
  """
  expert: jax.Array
  weight: jax.Array
  slot: jax.Array
  kept: jax.Array


def check_capacity_factor(capacity_factor: float) -> None:
  """Refuse a capacity factor that is not a finite number > 0 (inf would overflow C)."""
  if not (isinstance(capacity_factor, numbers.Real) and math.isfinite(capacity_factor)
          and capacity_factor > 0):
    raise ValueError(f'capacity_factor={capacity_factor} must be a finite number > 0 '
                     '(1.0 = exactly enough slots for a perfectly balanced router); for no '
                     "drops at all use dispatch='dropless'.")


def capacity(num_tokens: int, num_experts: int, k: int,
             capacity_factor: float) -> int:
  """Slots per expert per group: ceil(capacity_factor * k * S / E), at least 1.

  num_tokens S is a static group size >= 0 (0 gives the floor of 1 slot; the MoE layer
  refuses empty inputs before routing).
  """
  if num_tokens < 0:
    raise ValueError(f'num_tokens={num_tokens} must be >= 0 (the tokens in one routing '
                     'group).')
  if num_experts < 1:
    raise ValueError(f'num_experts={num_experts} must be >= 1.')
  if not 1 <= k <= num_experts:
    raise ValueError(f'k={k} must be between 1 and num_experts={num_experts}.')
  check_capacity_factor(capacity_factor)
  return max(1, math.ceil(capacity_factor * k * num_tokens / num_experts))


def router_probs(logits: jax.Array) -> jax.Array:
  """softmax(logits) in float32 over the last axis, 0 for a token where it is undefined
  (see the module docstring). The select comes before the softmax, so the other tokens'
  gradients stay finite and no NaN ever reaches exp."""
  logits = logits.astype(jnp.float32)
  finite = jnp.isfinite(logits)
  defined = (jnp.all(finite | (logits < 0), axis=-1, keepdims=True)      # -inf is fine
             & jnp.any(finite, axis=-1, keepdims=True))
  return jnp.where(defined, jax.nn.softmax(jnp.where(defined, logits, 0.0), axis=-1), 0.0)


def queue_positions(expert: jax.Array, num_experts: int,
                    requested: jax.Array | None = None) -> jax.Array:
  """Position of each choice in its expert's queue, in priority order.

  expert: i32[S, K] -> i32[S, K]. Priority is choice-major (column k=0 for all
  tokens, then k=1, ...), token-major within a choice. Choices where `requested`
  (bool[S, K]) is False take no place in any queue and get -1.
  """
  s, k = expert.shape
  onehot = jax.nn.one_hot(expert.T.reshape(k * s), num_experts, dtype=jnp.int32)  # [K*S, E]
  if requested is not None:
    onehot = onehot * requested.T.reshape(k * s, 1)
  # Exclusive running count per expert = how many earlier choices want the same expert.
  before = jnp.cumsum(onehot, axis=0) - onehot
  pos = jnp.sum(before * onehot, axis=-1)                                         # [K*S]
  pos = pos.reshape(k, s).T
  return pos if requested is None else jnp.where(requested, pos, -1)


SCORES = ('softmax', 'sigmoid')


def sigmoid_probs(logits: jax.Array) -> jax.Array:
  """sigmoid(logits) in float32, 0 for a token with a non-finite logit (as router_probs)."""
  logits = logits.astype(jnp.float32)
  defined = jnp.all(jnp.isfinite(logits), axis=-1, keepdims=True)
  return jnp.where(defined, jax.nn.sigmoid(jnp.where(defined, logits, 0.0)), 0.0)


def limit_groups(scores: jax.Array, n_group: int, topk_group: int) -> jax.Array:
  """scores f32[S, E] with the experts outside each token's topk_group best groups (of
  n_group equal groups, a group scored by the sum of its two best experts) at -inf."""
  s, e = scores.shape
  grouped = scores.reshape(s, n_group, e // n_group)
  best2 = jax.lax.top_k(grouped, min(2, e // n_group))[0].sum(-1)      # [S, n_group]
  _, keep = jax.lax.top_k(best2, topk_group)                           # [S, topk_group]
  mask = jnp.sum(jax.nn.one_hot(keep, n_group, dtype=jnp.int32), axis=1) > 0
  return jnp.where(jnp.repeat(mask, e // n_group, axis=-1), scores, -jnp.inf)


def route_top_k(logits: jax.Array, k: int, capacity: int, *,
                normalize_weights: bool | None = None,
                bias: jax.Array | None = None, score: str = 'softmax',
                groups: tuple[int, int] | None = None,
                scale: float = 1.0) -> RoutingPlan:
  """Token-choice top-k routing with capacity.

  logits: f32[S, E]; bias: f32[E] added to probs for selection only.
  normalize_weights defaults to k >= 2. score: 'softmax' or 'sigmoid' probabilities;
  groups: (n_group, topk_group) for group-limited selection; scale multiplies the
  weights last (DeepSeek-V3's routed_scaling_factor).
  """
  s, e = logits.shape
  if not 1 <= k <= e:
    raise ValueError(f'k={k} must be between 1 and the number of experts {e}.')
  if normalize_weights is None:
    normalize_weights = k >= 2
  probs = (router_probs if score == 'softmax' else sigmoid_probs)(logits)   # [S, E]
  scores = probs if bias is None else probs + bias.astype(jnp.float32)
  if groups is not None:
    scores = limit_groups(scores, *groups)
  _, expert = jax.lax.top_k(jax.lax.stop_gradient(scores), k)          # [S, K]
  weight = jnp.take_along_axis(probs, expert, axis=-1)                 # [S, K]
  requested = weight > 0
  if normalize_weights:
    total = jnp.sum(weight, axis=-1, keepdims=True)
    weight = weight / jnp.where(total > 0, total, 1.0)                 # 0, not 0/0
  if scale != 1.0:
    weight = weight * scale
  slot = queue_positions(expert, e, requested)
  kept = requested & (slot < capacity)
  return RoutingPlan(expert=expert.astype(jnp.int32),
                     weight=jnp.where(kept, weight, 0.0),
                     slot=slot.astype(jnp.int32), kept=kept)


def check_groups(num_experts: int, k: int, score: str, n_group: int, topk_group: int):
  """Refuse a score or group layout route_top_k cannot serve."""
  if score not in SCORES:
    raise ValueError(f'router score={score!r} is unknown; use one of {SCORES}.')
  if n_group < 1 or num_experts % n_group or not 1 <= topk_group <= n_group:
    raise ValueError(f'n_group={n_group} must divide the {num_experts} experts and '
                     f'topk_group={topk_group} be between 1 and n_group.')
  if n_group > 1 and k > topk_group * (num_experts // n_group):
    raise ValueError(f'k={k} is more than the {topk_group * (num_experts // n_group)} '
                     f'experts of topk_group={topk_group} groups of {num_experts // n_group}.')


def route_expert_choice(logits: jax.Array, capacity: int) -> RoutingPlan:
  """Expert choice (Zhou et al. 2022): each expert takes its top-C tokens.

  Expressed as a RoutingPlan with K = E (choice j of a token is expert j), so every
  dispatch backend serves it. It ranks a token against the whole group, later positions
  included: see check_expert_choice for where that is allowed.
  """
  s, e = logits.shape
  probs = router_probs(logits)                                         # [S, E]
  # rank[s, e] = position of token s in expert e's order by descending probability.
  order = jnp.argsort(-jax.lax.stop_gradient(probs), axis=0, stable=True)  # [S, E]
  rank = jnp.argsort(order, axis=0).astype(jnp.int32)                  # inverse perm
  requested = probs > 0
  kept = requested & (rank < capacity)
  expert = jnp.broadcast_to(jnp.arange(e, dtype=jnp.int32), (s, e))
  return RoutingPlan(expert=expert, weight=jnp.where(kept, probs, 0.0),
                     slot=jnp.where(requested, rank, -1), kept=kept)


def check_expert_choice(causal: bool, allow_lookahead: bool) -> None:
  """The one place the expert-choice policy lives: in a causal model a token's output
  would depend on later tokens, so it is refused unless the leak is asked for."""
  if causal and not allow_lookahead:
    raise ValueError(
        'Expert-choice routing ranks every token of the group, so in a causal model a '
        "token's output depends on later tokens. Use routing='top_k', or pass "
        'allow_lookahead=True if you accept the leak.')


# ----------------------------------------------------------------- losses and metrics

def load_balance_loss(probs: jax.Array, expert: jax.Array) -> jax.Array:
  """Switch load-balance loss E * sum_e f_e * P_e; 1.0 when perfectly balanced.

  probs f32[S, E]; expert i32[S, K] (only the first choice, column 0, counts for f).
  """
  counts, prob_sum, n = balance_stats(probs, expert)
  return balance_loss_from_stats(counts, prob_sum, n)


def balance_stats(probs: jax.Array, expert: jax.Array):
  """Additive statistics behind the balance loss, so shards can psum them.

  Returns (first-choice counts f32[E], summed probs f32[E], token count f32[]).
  """
  e = probs.shape[-1]
  counts = jnp.sum(jax.nn.one_hot(expert[..., 0], e, dtype=jnp.float32),
                   axis=tuple(range(expert.ndim - 1)))
  prob_sum = jnp.sum(probs.astype(jnp.float32), axis=tuple(range(probs.ndim - 1)))
  n = jnp.asarray(math.prod(probs.shape[:-1]), jnp.float32)
  return counts, prob_sum, n


def balance_loss_from_stats(counts, prob_sum, n):
  e = counts.shape[-1]
  return e * jnp.sum((counts / n) * (prob_sum / n))


def router_z_loss(logits: jax.Array) -> jax.Array:
  """ST-MoE z-loss: mean over tokens of logsumexp(logits)^2. logits f32[..., E]."""
  z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
  return jnp.mean(z ** 2)


def router_entropy(probs: jax.Array) -> jax.Array:
  """Mean entropy (nats) of the router distribution; log(E) is uniform."""
  return jnp.mean(-jnp.sum(probs * jnp.log(jnp.clip(probs, 1e-30)), axis=-1))


def expert_counts(expert: jax.Array, num_experts: int,
                  kept: jax.Array | None = None) -> jax.Array:
  """Choices per expert, f32[E]: all of them, or only the kept ones. expert i32[..., K]."""
  w = jnp.ones(expert.shape, jnp.float32) if kept is None else kept.astype(jnp.float32)
  return jnp.sum(jax.nn.one_hot(expert, num_experts, dtype=jnp.float32) * w[..., None],
                 axis=tuple(range(expert.ndim)))


def expert_load(counts: jax.Array) -> jax.Array:
  """Counts per expert f32[E] -> fractions summing to 1 (all zeros stay zeros)."""
  return counts / jnp.maximum(jnp.sum(counts), 1.0)


def max_violation(load: jax.Array) -> jax.Array:
  """MaxVio = max_load / mean_load - 1 (0 when perfectly balanced). load f32[E]."""
  return jnp.max(load) / jnp.mean(load) - 1.0


def dropped_fraction(kept_counts: jax.Array, demand_counts: jax.Array) -> jax.Array:
  """Share of token choices that found no slot, from expert_counts with and without kept."""
  return 1.0 - jnp.sum(kept_counts) / jnp.sum(demand_counts)


def routing_stats(logits: jax.Array, plan: RoutingPlan) -> dict[str, jax.Array]:
  """Additive statistics of routed groups, so shards can psum them before routing_metrics.

  logits f32[..., S, E], plan fields [..., S, K].
  """
  e = logits.shape[-1]
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  first, prob_sum, n = balance_stats(probs, plan.expert)
  return dict(first_counts=first, prob_sum=prob_sum, tokens=n,
              demand=expert_counts(plan.expert, e, plan.slot >= 0),
              kept=expert_counts(plan.expert, e, plan.kept),
              entropy_sum=router_entropy(probs) * n)


def routing_metrics(stats: dict[str, jax.Array], *,
                    expert_choice: bool = False) -> dict[str, jax.Array]:
  """Metrics from (summed) routing_stats: load_balance_loss, dropped_fraction,
  expert_load [E] (share of all K choices asking for each expert, before capacity),
  max_violation, router_entropy. Expert choice is balanced by construction: its balance
  loss is 0 and its load is that of the kept choices."""
  if expert_choice:
    lb, load = jnp.zeros((), jnp.float32), expert_load(stats['kept'])
  else:
    lb = balance_loss_from_stats(stats['first_counts'], stats['prob_sum'], stats['tokens'])
    load = expert_load(stats['demand'])
  return {'load_balance_loss': lb,
          'dropped_fraction': dropped_fraction(stats['kept'], stats['demand']),
          'expert_load': load, 'max_violation': max_violation(load),
          'router_entropy': stats['entropy_sum'] / stats['tokens']}


def update_balance_bias(bias: jax.Array, load: jax.Array, rate: float) -> jax.Array:
  """Loss-free balancing step: bias += rate * sign(mean_load - load).

  Under-loaded experts get a larger selection bias, over-loaded a smaller one.
  bias f32[..., E], load [..., E] (counts or fractions, any scale; leading axes are
  independent layers, e.g. a scanned stack's [G, E]).
  """
  load = load.astype(jnp.float32)
  return bias + rate * jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)
