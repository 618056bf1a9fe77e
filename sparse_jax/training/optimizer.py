"""The optimizer of a run: AdamW with warmup and cosine decay, clipping, and the pruner."""
from __future__ import annotations

import jax
import optax

from sparse_jax import pruning, roles
from sparse_jax.config import Spec


def make_optimizer(spec: Spec, param_roles: dict) -> optax.GradientTransformation:
  """AdamW with linear warmup then cosine decay to min_lr_ratio * lr over lr_decay_steps,
  global-norm clipping, and sparse_jax.pruning.wrap around it when spec.pruning is set
  (the pruner owns the final update; it prunes the kernels that param_roles, the model's
  sparse_jax.roles.param_roles, puts in pruning.targets). Weight decay applies to
  matrices only."""
  t = spec.train
  horizon = max(t.lr_decay_steps, t.warmup_steps + 1)
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, t.lr, t.warmup_steps, horizon, end_value=t.lr * t.min_lr_ratio)
  # A scanned stack's leading layer axis does not make a norm scale a matrix.
  is_stacked = roles.stacked(param_roles)
  decay_mask = lambda params: jax.tree_util.tree_map_with_path(
      lambda path, p: p.ndim - is_stacked(pruning.paths.plain_path(path), p) >= 2, params)
  tx = optax.adamw(schedule, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay, mask=decay_mask)
  if t.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(t.grad_clip), tx)
  if spec.pruning is None:
    return tx
  return pruning.wrap(tx, **spec.pruning.wrap_kwargs(spec.model.num_heads),
                      prunable=roles.prunable(param_roles, spec.pruning.targets),
                      stacked=is_stacked)
