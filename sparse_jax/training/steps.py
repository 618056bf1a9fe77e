"""Optimizer, loss and the pure train/eval steps of the language model.

The steps take and return the nnx state of (model, optimizer) so that jax.jit can pin
their shardings; the model is rebuilt inside with nnx.merge.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx


def make_optimizer(config) -> optax.GradientTransformation:
  """AdamW with linear warmup then cosine decay to min_lr_ratio * lr, global-norm clipping.

  Weight decay applies to matrices only (not norm scales or biases).
  """
  t = config.train
  horizon = max(t.lr_decay_steps or t.steps, t.warmup_steps + 1)
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, t.lr, t.warmup_steps, horizon, end_value=t.lr * t.min_lr_ratio)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  adamw = optax.adamw(schedule, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay,
                      mask=decay_mask)
  tx = optax.chain(optax.clip_by_global_norm(t.grad_clip), adamw) if t.grad_clip > 0 else adamw
  p = config.pruning
  if not (p.sparsity > 0 or p.n_m):
    return tx
  from sparse_jax import pruning                  # the pruner owns the final update
  from sparse_jax.config import parse_n_m, pruning_end_step
  from sparse_jax.pruning.paths import prunable_in
  extra = dict(structure=p.structure, num_heads=config.model.num_heads) if p.structure else {}
  return pruning.wrap(
      tx, sparsity=p.sparsity, method=p.method, schedule=p.schedule,
      start_step=p.start_step, end_step=pruning_end_step(config),
      update_every=p.update_every, distribution=p.distribution, scope=p.scope,
      n_m=parse_n_m(p.n_m) if p.n_m else None, prunable=prunable_in(p.get('targets', 'all')), **extra)


def sparsity_metrics(model, opt) -> dict[str, jax.Array]:
  """Zero fraction of every pruned leaf ('sparsity/<path>') and non-zero parameter count."""
  from sparse_jax import pruning
  from sparse_jax.pruning.paths import path_str, plain_path
  masks = pruning.masks(opt.opt_state)
  out = {}
  leaves = jax.tree_util.tree_flatten_with_path(masks, is_leaf=lambda x: x is None)[0]
  for path, mask in leaves:
    if mask is not None:
      name = path_str(plain_path(path))
      out[f'sparsity/{name}'] = 1.0 - jnp.mean(mask.astype(jnp.float32))
  params = jax.tree.leaves(nnx.state(model, nnx.Param))
  out['nonzero_params'] = sum(jnp.count_nonzero(x) for x in params).astype(jnp.float32)
  return out


def lm_loss(model, batch, *, train: bool, lb_coef: float, z_coef: float):
  """Next-token cross entropy (nats per token) plus the weighted MoE aux losses."""
  logits, aux = model(batch['inputs'], train=train)                    # [B, L, V]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch['targets']).mean()
  total = ce + lb_coef * aux['load_balance_loss'] + z_coef * aux['router_z_loss']
  return total, (ce, aux)


def _routing_metrics(aux) -> dict[str, jax.Array]:
  """Scalar routing metrics: per MoE block, and averaged over blocks."""
  out = {}
  layers = aux['layers']
  for name in ('dropped_fraction', 'max_violation', 'router_entropy',
               'load_balance_loss', 'router_z_loss'):
    for i, layer in layers.items():
      out[f'moe/{i}/{name}'] = layer[name]
    if layers:
      out[name] = sum(layer[name] for layer in layers.values()) / len(layers)
  return out


def make_train_step(graphdef, config):
  loss = lambda m, b: lm_loss(m, b, train=True, lb_coef=config.moe.load_balance_coef,
                              z_coef=config.moe.z_loss_coef)

  def train_step(state, batch):
    model, opt = nnx.merge(graphdef, state)
    (total, (ce, aux)), grads = nnx.value_and_grad(loss, has_aux=True)(model, batch)
    opt.update(model, grads)
    metrics = {'loss': ce, 'total_loss': total, 'grad_norm': optax.tree.norm(grads),
               **_routing_metrics(aux)}
    if config.pruning.sparsity > 0 or config.pruning.n_m:
      metrics.update(sparsity_metrics(model, opt))
    return nnx.state((model, opt)), metrics

  return train_step


def make_eval_step(graphdef, config):
  def eval_step(state, batch):
    model, _ = nnx.merge(graphdef, state)
    _, (ce, aux) = lm_loss(model, batch, train=False, lb_coef=0.0, z_coef=0.0)
    return {'loss': ce, **_routing_metrics(aux)}

  return eval_step


def bits_per_byte(nats_per_token: float) -> float:
  """Byte-level tokens: bits per byte = nats per token / ln 2."""
  return nats_per_token / math.log(2)
