"""Loss, the pure train/eval steps, and their compilation with shardings.

The steps take and return the nnx state of (model, optimizer) so that jax.jit can pin
their shardings; the model is rebuilt inside with nnx.merge. build() is the one place
that makes the model, the optimizer and the jitted steps: the trainer, evaluation and the
experiments all use it.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from sparse_jax import pruning, sharding
from sparse_jax.config import Spec
from sparse_jax.models import TransformerLM
from sparse_jax.training.optimizer import make_optimizer

ROUTING_METRICS = ('dropped_fraction', 'max_violation', 'router_entropy',
                   'load_balance_loss', 'router_z_loss')


def lm_loss(model, batch, *, train: bool, lb_coef: float, z_coef: float):
  """Next-token cross entropy (nats per token) plus the weighted MoE aux losses."""
  logits, aux = model(batch['inputs'], train=train)                    # [B, L, V]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch['targets']).mean()
  total = ce + lb_coef * aux['load_balance_loss'] + z_coef * aux['router_z_loss']
  return total, (ce, aux)


def routing_metrics(aux) -> dict[str, jax.Array]:
  """Scalar routing metrics: per MoE block ('moe/<i>/<name>'), and averaged over blocks."""
  out = {}
  layers = aux['layers']
  for name in ROUTING_METRICS:
    for i, layer in layers.items():
      out[f'moe/{i}/{name}'] = layer[name]
    if layers:
      out[name] = sum(layer[name] for layer in layers.values()) / len(layers)
  return out


def sparsity_metrics(model, opt) -> dict[str, jax.Array]:
  """Zero fraction of every pruned leaf ('sparsity/<path>') and non-zero parameter count."""
  masks = pruning.masks(opt.opt_state)
  out = {}
  leaves = jax.tree_util.tree_flatten_with_path(masks, is_leaf=lambda x: x is None)[0]
  for path, mask in leaves:
    if mask is not None:
      name = pruning.paths.path_str(pruning.plain_path(path))
      out[f'sparsity/{name}'] = 1.0 - jnp.mean(mask.astype(jnp.float32))
  params = jax.tree.leaves(nnx.state(model, nnx.Param))
  out['nonzero_params'] = sum(jnp.count_nonzero(x) for x in params).astype(jnp.float32)
  return out


def make_train_step(graphdef, spec: Spec):
  moe = spec.model.moe
  coefs = dict(lb_coef=moe.load_balance_coef, z_coef=moe.z_loss_coef) if moe else dict(
      lb_coef=0.0, z_coef=0.0)
  loss = lambda m, b: lm_loss(m, b, train=True, **coefs)

  def train_step(state, batch):
    model, opt = nnx.merge(graphdef, state)
    (total, (ce, aux)), grads = nnx.value_and_grad(loss, has_aux=True)(model, batch)
    opt.update(model, grads)
    metrics = {'loss': ce, 'total_loss': total, 'grad_norm': optax.tree.norm(grads),
               **routing_metrics(aux)}
    if spec.pruning is not None:
      metrics.update(sparsity_metrics(model, opt))
    return nnx.state((model, opt)), metrics

  return train_step


def make_eval_step(graphdef):
  def eval_step(state, batch):
    model, _ = nnx.merge(graphdef, state)
    _, (ce, aux) = lm_loss(model, batch, train=False, lb_coef=0.0, z_coef=0.0)
    return {'loss': ce, **routing_metrics(aux)}

  return eval_step


class Steps(NamedTuple):
  """A run's compiled pieces. state is the nnx state of (model, optimizer), placed."""
  graphdef: Any
  state: Any
  shardings: Any
  train: Callable          # (state, batch) -> (state, metrics); donates state
  eval: Callable           # (state, batch) -> metrics


def build(spec: Spec, mesh: Mesh, model: TransformerLM | None = None) -> Steps:
  """The model of spec (or `model`), its optimizer, the state on the mesh, and the
  train and eval steps jitted with explicit shardings."""
  if model is None:
    model = TransformerLM(spec.model, mesh=mesh, rngs=nnx.Rngs(spec.seed))
  opt = nnx.Optimizer(model, make_optimizer(spec), wrt=nnx.Param)
  graphdef, state = nnx.split((model, opt))
  shardings = sharding.state_shardings(state, mesh)
  batch = sharding.batch_sharding(mesh)
  train = jax.jit(make_train_step(graphdef, spec), in_shardings=(shardings, batch),
                  out_shardings=(shardings, None), donate_argnums=0)
  evaluate = jax.jit(make_eval_step(graphdef), in_shardings=(shardings, batch))
  return Steps(graphdef, jax.device_put(state, shardings), shardings, train, evaluate)


def bits_per_byte(nats_per_token: float) -> float:
  """Byte-level tokens: bits per byte = nats per token / ln 2."""
  return nats_per_token / math.log(2)
