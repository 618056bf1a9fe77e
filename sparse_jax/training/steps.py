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
from jax.sharding import Mesh, PartitionSpec as P

from sparse_jax import pruning, roles, sharding
from sparse_jax.config import ConfigError, Spec
from sparse_jax.models import TransformerLM
from sparse_jax.moe import RouterBias
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
  """Routing metrics of aux['layers']: per MoE block ('moe/<i>/<name>', with the
  expert_load vector [E]), and the scalars averaged over blocks."""
  layers = aux['layers']
  out = {f'moe/{i}/expert_load': layer['expert_load'] for i, layer in layers.items()}
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


# Per-layer losses whose step value is the mean over micro-batches (a micro-batch's own
# value uses its global statistics).
_MICRO_MEANS = ('load_balance_loss', 'router_z_loss')


def split_microbatches(batch, m: int, mesh: Mesh | None = None):
  """[B, ...] -> [M, B/M, ...]: micro-batch i takes rows i, i+M, i+2M, ... so that each
  device's micro-batch rows are rows it already holds (batch split over devices in
  contiguous blocks whose size M divides)."""
  def split(x):
    x = x.reshape(x.shape[0] // m, m, *x.shape[1:]).swapaxes(0, 1)
    return x if mesh is None else sharding.reshard(
        x, mesh, P(None, sharding.token_axes(mesh) or None))
  return jax.tree.map(split, batch)


def make_train_step(graphdef, spec: Spec, mesh: Mesh | None = None):
  """(state, batch) -> (state, metrics): one optimizer update from train.microbatches
  micro-batches whose gradients are averaged.

  Every micro-batch sees the step's parameters and loss-free biases. LM loss and z-loss
  are means over all the step's tokens (equal-sized micro-batches); the load-balance
  loss of a micro-batch uses that micro-batch's global statistics and the step's value
  is their mean; the loss-free biases are updated once, from the step's summed counts;
  routing metrics come from the step's summed statistics.
  """
  moe = spec.model.moe
  coefs = dict(lb_coef=moe.load_balance_coef, z_coef=moe.z_loss_coef) if moe else dict(
      lb_coef=0.0, z_coef=0.0)
  m = spec.train.microbatches

  def train_step(state, batch):
    model, opt = nnx.merge(graphdef, state)
    # Parameters are differentiated, biases stay the step's, the rest (RNG counters) is
    # carried from one micro-batch to the next.
    mdef, params, bias, rest = nnx.split(model, nnx.Param, RouterBias, ...)

    def micro(carry, mb):
      grads, rest = carry

      def loss(params):
        mm = nnx.merge(mdef, params, bias, rest, copy=True)
        total, (ce, aux) = lm_loss(mm, mb, train=True, **coefs)
        return total, (ce, aux, nnx.split(mm, nnx.Param, RouterBias, ...)[3])

      (total, (ce, aux, rest)), g = jax.value_and_grad(loss, has_aux=True)(params)
      layers = {i: {k: a[k] for k in ('stats', *_MICRO_MEANS)}
                for i, a in aux['layers'].items()}
      return (jax.tree.map(jnp.add, grads, g), rest), (total, ce, layers)

    zeros = jax.tree.map(jnp.zeros_like, params)
    (grads, rest), (total, ce, layers) = jax.lax.scan(
        micro, (zeros, rest), split_microbatches(batch, m, mesh))
    grads = jax.tree.map(lambda g: g / m, grads)
    model = nnx.merge(mdef, params, bias, rest)
    step_aux, demand = {}, {}
    for i, layer in model.moe_layers().items():
      stats = jax.tree.map(lambda x: x.sum(0), layers[i]['stats'])
      demand[i] = stats['demand']
      step_aux[i] = {**layer.routing_metrics(stats),
                     **{k: layers[i][k].mean() for k in _MICRO_MEANS}}
    model.update_biases(demand)
    opt.update(model, grads)
    metrics = {'loss': ce.mean(), 'total_loss': total.mean(),
               'grad_norm': optax.tree.norm(grads), **routing_metrics({'layers': step_aux})}
    if spec.pruning is not None:
      metrics.update(sparsity_metrics(model, opt))
    return nnx.state((model, opt)), metrics

  return train_step


def eval_metrics(model, batch) -> dict:
  """Cross-entropy (nats per token, no auxiliary losses) and routing metrics of a batch."""
  _, (ce, aux) = lm_loss(model, batch, train=False, lb_coef=0.0, z_coef=0.0)
  return {'loss': ce, **routing_metrics(aux)}


def make_eval_step(graphdef):
  """(state of (model, optimizer), batch) -> eval_metrics of the model."""
  def eval_step(state, batch):
    model, _ = nnx.merge(graphdef, state)
    return eval_metrics(model, batch)

  return eval_step


class Steps(NamedTuple):
  """A run's compiled pieces. state is the nnx state of (model, optimizer), placed."""
  graphdef: Any
  state: Any
  shardings: Any
  train: Callable          # (state, batch) -> (state, metrics); donates state
  eval: Callable           # (state, batch) -> metrics


def build(spec: Spec, mesh: Mesh, model: TransformerLM | None = None) -> Steps:
  """The model of spec (or `model`), its optimizer, the state on the mesh (split over
  'data' too with spec.fsdp), and the train and eval steps jitted with explicit
  shardings. Raises ConfigError when FSDP cannot split a parameter."""
  if model is None:
    model = TransformerLM(spec.model, mesh=mesh, rngs=nnx.Rngs(spec.seed))
  model.remat = spec.train.remat
  opt = nnx.Optimizer(model, make_optimizer(spec, roles.param_roles(model)), wrt=nnx.Param)
  graphdef, state = nnx.split((model, opt))
  try:
    sharding.state_shardings(nnx.state(model), mesh, fsdp=spec.fsdp)  # names the parameter
    shardings = sharding.state_shardings(state, mesh, fsdp=spec.fsdp)
  except ValueError as e:
    raise ConfigError(f'mesh.fsdp=True: {e}; use a data axis that divides it, or '
                      'mesh.fsdp=False') from None
  batch = sharding.batch_sharding(mesh)
  train = jax.jit(make_train_step(graphdef, spec, mesh), in_shardings=(shardings, batch),
                  out_shardings=(shardings, None), donate_argnums=0)
  evaluate = jax.jit(make_eval_step(graphdef), in_shardings=(shardings, batch))
  return Steps(graphdef, jax.device_put(state, shardings), shardings, train, evaluate)


def memory(steps: Steps, compiled) -> dict[str, int]:
  """state_bytes_per_device (parameters + optimizer state on the most loaded device, from
  the arrays' shardings) and compiled_temp_bytes (XLA's memory analysis of `compiled`,
  the train step compiled with steps.train.lower(...).compile())."""
  return {'state_bytes_per_device': sharding.bytes_per_device(steps.state),
          'compiled_temp_bytes': int(compiled.memory_analysis().temp_size_in_bytes)}


def bits_per_byte(nats_per_token: float) -> float:
  """Byte-level tokens: bits per byte = nats per token / ln 2."""
  return nats_per_token / math.log(2)
