"""NNX mixture-of-experts layers: Router -> dispatch -> Experts -> combine.

Shape legend: B batch, L length, D d_model, F d_ff, E experts, K choices per token,
G groups, S tokens per group, C capacity, P expert-parallel degree (mesh axis 'expert').

The math lives in routing.py and dispatch.py; these modules hold parameters and wire the
pure functions together. With a mesh, the routed part runs in jax.shard_map: each
device routes its own tokens, and with P > 1 one all_to_all sends the [E, C, D] slot
buffers to the devices owning the experts and one brings the results back.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from sparse_jax import dispatch as dispatch_lib
from sparse_jax import routing as routing_lib
from sparse_jax.params import weight
from sparse_jax.sharding import axis_size, reshard, token_axes

ACTIVATIONS = {'gelu': jax.nn.gelu, 'relu': jax.nn.relu, 'swiglu': jax.nn.silu}
ROUTINGS = ('top_k', 'expert_choice')
BALANCING = ('aux_loss', 'loss_free')


class RouterBias(nnx.Variable):
  """Selection bias for loss-free balancing: state, not a trained parameter."""


class Router(nnx.Module):
  """Linear router with float32 logits. x [..., D] -> logits f32[..., E].

  jitter > 0 multiplies the router's input by U(1 - jitter, 1 + jitter) in training
  (Switch's input jitter). `bias` [E] shifts selection only (loss-free balancing).
  """

  def __init__(self, d_model: int, num_experts: int, *, init_scale: float = 1.0,
               jitter: float = 0.0, mesh: Mesh | None = None, rngs: nnx.Rngs):
    self.kernel = weight(rngs.params(), (d_model, num_experts), init_scale=init_scale,
                         names=(None, None), mesh=mesh)
    self.bias = RouterBias(jnp.zeros((num_experts,), jnp.float32))
    self.jitter = jitter
    self.rngs = rngs.fork() if jitter > 0 else None

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    x = x.astype(jnp.float32)
    if train and self.jitter > 0:
      x = x * jax.random.uniform(self.rngs.jitter(), x.shape, jnp.float32,
                                 1.0 - self.jitter, 1.0 + self.jitter)
    return jnp.einsum('...d,de->...e', x, self.kernel[...])


def ffn(w: dict[str, jax.Array], x: jax.Array, activation: str) -> jax.Array:
  """act(x @ wi) @ wo, or (silu(x @ wi_gate) * (x @ wi)) @ wo for swiglu. x [N, D]."""
  h = jnp.einsum('nd,df->nf', x, w['wi'])
  if activation == 'swiglu':
    h = jax.nn.silu(jnp.einsum('nd,df->nf', x, w['wi_gate'])) * h
  else:
    h = ACTIVATIONS[activation](h)
  return jnp.einsum('nf,fd->nd', h, w['wo'])


def _check_activation(activation):
  if activation not in ACTIVATIONS:
    raise ValueError(f"activation={activation!r} is unknown; use one of "
                     f"{sorted(ACTIVATIONS)}.")


class Experts(nnx.Module):
  """E feed-forward experts with stacked weights wi [E, D, F], wo [E, F, D]
  (swiglu adds wi_gate [E, D, F]). Expert e computes ffn(x) = act(x @ wi[e]) @ wo[e].

  To add an expert type, subclass and override `apply` (and `ragged_apply` for the
  dropless backend): both are pure functions of `weights()`, which the expert-parallel
  path shards over 'expert' along the leading axis.
  """

  def __init__(self, num_experts: int, d_model: int, d_ff: int, *,
               activation: str = 'gelu', init_scale: float = 1.0,
               param_dtype=jnp.float32, mesh: Mesh | None = None, rngs: nnx.Rngs):
    _check_activation(activation)
    self.activation = activation
    mk = functools.partial(weight, init_scale=init_scale, dtype=param_dtype, mesh=mesh,
                           names=('expert', None, None))
    self.wi = mk(rngs.params(), (num_experts, d_model, d_ff))
    if activation == 'swiglu':
      self.wi_gate = mk(rngs.params(), (num_experts, d_model, d_ff))
    self.wo = mk(rngs.params(), (num_experts, d_ff, d_model))

  def weights(self) -> dict[str, jax.Array]:
    """Arrays with a leading expert axis [E, ...]; the input of apply()."""
    names = ('wi', 'wi_gate', 'wo') if self.activation == 'swiglu' else ('wi', 'wo')
    return {n: getattr(self, n)[...] for n in names}

  def apply(self, w: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    """x [E, N, D] -> [E, N, D], expert e on row block e."""
    f = functools.partial(ffn, activation=self.activation)
    if jax.default_backend() == 'cpu':
      # XLA:CPU runs E plain matmuls faster than one batched matmul (~5% of the layer,
      # experiments/bench_moe_layer.py); accelerators prefer the batched form.
      return jnp.stack([f(jax.tree.map(lambda a, i=i: a[i], w), x[i])
                        for i in range(x.shape[0])])
    return jax.vmap(f)(w, x)

  def ragged_apply(self, w: dict[str, jax.Array], x: jax.Array,
                   group_sizes: jax.Array) -> jax.Array:
    """x [N, D] sorted by expert, group_sizes i32[E] -> [N, D]."""
    h = jax.lax.ragged_dot(x, w['wi'], group_sizes)
    if self.activation == 'swiglu':
      h = jax.nn.silu(jax.lax.ragged_dot(x, w['wi_gate'], group_sizes)) * h
    else:
      h = ACTIVATIONS[self.activation](h)
    return jax.lax.ragged_dot(h, w['wo'], group_sizes)


class DenseFFN(nnx.Module):
  """Dense FFN act(x @ wi) @ wo, x [..., D]: the shared expert and the benchmarks' baseline."""

  def __init__(self, d_model: int, d_ff: int, *, activation: str = 'gelu',
               init_scale: float = 1.0, param_dtype=jnp.float32,
               mesh: Mesh | None = None, rngs: nnx.Rngs):
    _check_activation(activation)
    self.activation = activation
    mk = functools.partial(weight, init_scale=init_scale, dtype=param_dtype, mesh=mesh)
    self.wi = mk(rngs.params(), (d_model, d_ff), names=(None, 'model'))
    if activation == 'swiglu':
      self.wi_gate = mk(rngs.params(), (d_model, d_ff), names=(None, 'model'))
    self.wo = mk(rngs.params(), (d_ff, d_model), names=('model', None))

  def __call__(self, x: jax.Array) -> jax.Array:
    names = ('wi', 'wi_gate', 'wo') if self.activation == 'swiglu' else ('wi', 'wo')
    w = {n: getattr(self, n)[...] for n in names}
    return ffn(w, x.reshape(-1, x.shape[-1]), self.activation).reshape(x.shape)


@dataclasses.dataclass(frozen=True)
class _Settings:
  """Static settings of the routed body (hashable, closed over by shard_map)."""
  num_experts: int
  k: int
  capacity_factor: float
  dispatch: str
  routing: str
  normalize_weights: bool | None
  group_size: int | None
  allow_lookahead: bool
  token_axes: tuple[str, ...]
  ep: int                                     # size of mesh axis 'expert'
  apply: Callable = dataclasses.field(compare=False)
  ragged_apply: Callable = dataclasses.field(compare=False)


def route_groups(cfg: _Settings, logits: jax.Array, bias: jax.Array | None):
  """Route G groups: logits f32[G, S, E] -> (RoutingPlan with fields [G, S, K], capacity C)."""
  s, e, k = logits.shape[1], cfg.num_experts, cfg.k
  if cfg.routing == 'expert_choice':
    c = routing_lib.capacity(s, e, k, cfg.capacity_factor)
    route = functools.partial(routing_lib.route_expert_choice, capacity=c, causal=True,
                              allow_lookahead=cfg.allow_lookahead)
  else:
    # Dropless keeps every choice: no expert can be asked for more than S slots.
    c = s if cfg.dispatch == 'dropless' else routing_lib.capacity(s, e, k, cfg.capacity_factor)
    route = functools.partial(routing_lib.route_top_k, k=k, capacity=c,
                              normalize_weights=cfg.normalize_weights, bias=bias)
  return jax.vmap(route)(logits), c


def _routed(x, logits, weights, bias, *, cfg: _Settings):
  """The routed FFN on the tokens one device holds.

  x [B, L, D], logits f32[B, L, E], weights {name: [E/P, ...]}, bias f32[E].
  Returns y [B, L, D] and additive routing statistics summed over all devices.
  """
  b, l, d = x.shape
  e = cfg.num_experts
  s = cfg.group_size or b * l
  if (b * l) % s:
    raise ValueError(f'group_size={s} must divide the {b * l} tokens each device holds '
                     f'(per-device batch {b} x length {l}).')
  g = b * l // s
  xg, lg = x.reshape(g, s, d), logits.reshape(g, s, e)                  # [G, S, *]
  rp, c = route_groups(cfg, lg, bias)                                  # [G, S, K]

  if cfg.dispatch == 'dropless':
    flat = routing_lib.RoutingPlan(*(f.reshape(g * s, -1) for f in rp))
    y = dispatch_lib.dropless(xg.reshape(g * s, d), flat, e,
                              functools.partial(cfg.ragged_apply, weights))
  else:
    if cfg.dispatch == 'index':
      send, ctx = dispatch_lib.index_dispatch(xg, rp, e, c)             # [E, G*C, D]
    else:
      send, ctx = jax.vmap(dispatch_lib.einsum_dispatch, (0, 0, None, None))(xg, rp, e, c)
      send = send.transpose(1, 0, 2, 3).reshape(e, g * c, d)          # [G,E,C,D] -> [E,GC,D]
    out = _exchange(cfg.apply(weights, _exchange(send, cfg.ep)), cfg.ep, back=True)
    if cfg.dispatch == 'index':
      y = dispatch_lib.index_combine(out, rp, ctx)                      # [G, S, D]
    else:
      out = out.reshape(e, g, c, d).transpose(1, 0, 2, 3)
      y = jax.vmap(dispatch_lib.einsum_combine)(out, ctx)

  probs = jax.nn.softmax(lg, axis=-1)
  first, prob_sum, n = routing_lib.balance_stats(probs, rp.expert)
  chosen = jax.nn.one_hot(rp.expert, e)                                 # [G, S, K, E]
  stats = dict(
      first_counts=first, prob_sum=prob_sum, tokens=n,
      demand=jnp.sum(chosen, axis=(0, 1, 2)),                          # all K choices
      kept=jnp.sum(chosen * rp.kept[..., None], axis=(0, 1, 2)),
      entropy_sum=routing_lib.router_entropy(probs) * n)
  if cfg.token_axes:
    stats = jax.lax.psum(stats, cfg.token_axes)
  return y.reshape(b, l, d).astype(x.dtype), stats


def _exchange(buf, ep, *, back=False):
  """Move slot buffers between the devices holding tokens and those holding experts.

  forward: [E, N, D] slots of local tokens -> [E/P, P*N, D] rows for local experts.
  back:    the inverse. With P > 1 each direction is exactly one all_to_all.
  """
  if ep == 1:
    return buf
  if not back:
    e, n, d = buf.shape
    # Chunk p of [P, E/P, N, D] goes to device p; received chunks stack by source.
    buf = jax.lax.all_to_all(buf.reshape(ep, e // ep, n, d), 'expert', 0, 0)
    return buf.transpose(1, 0, 2, 3).reshape(e // ep, ep * n, d)
  el, pn, d = buf.shape
  buf = buf.reshape(el, ep, pn // ep, d).transpose(1, 0, 2, 3)         # [P, E/P, N, D]
  return jax.lax.all_to_all(buf, 'expert', 0, 0).reshape(ep * el, pn // ep, d)


class MoE(nnx.Module):
  """Routed mixture-of-experts FFN. x [B, L, D] -> (y [B, L, D], aux).

  Args (beyond the contract's d_model, d_ff, num_experts, k, capacity_factor,
  dispatch, activation, mesh, rngs):
    routing: 'top_k' (token choice) or 'expert_choice' (non-causal; see routing.py).
    normalize_weights: renormalise the K weights; default k >= 2.
    group_size: tokens per routing group; default all tokens one device holds.
    causal: the layer sits in a causal model, where expert choice is refused unless
      allow_lookahead=True says the leak of future tokens is intended.
    balancing: 'aux_loss' (return the Switch loss for the trainer to weight) or
      'loss_free' (also update a selection bias in training, rate `bias_rate`).
    router_jitter, init_scale: Switch's input jitter and weight init scale.
    shared_d_ff: width of an always-on shared expert beside the routed ones.
    router, experts: modules to use instead of the defaults (see README, extending).

  aux (all float32, statistics over the global batch): load_balance_loss,
  router_z_loss, dropped_fraction, expert_load [E] (share of all K choices asking for
  each expert, before capacity), max_violation (of expert_load), router_entropy.
  """

  def __init__(self, d_model: int, d_ff: int, num_experts: int, *, k: int = 1,
               capacity_factor: float = 1.25, dispatch: str = 'index',
               activation: str = 'gelu', mesh: Mesh | None = None,
               rngs: nnx.Rngs | None = None, routing: str = 'top_k',
               normalize_weights: bool | None = None, group_size: int | None = None,
               causal: bool = False, allow_lookahead: bool = False, balancing: str = 'aux_loss',
               bias_rate: float = 1e-3, router_jitter: float = 0.0,
               init_scale: float = 1.0, shared_d_ff: int | None = None,
               param_dtype=jnp.float32, router: nnx.Module | None = None,
               experts: nnx.Module | None = None):
    rngs = nnx.Rngs(0) if rngs is None else rngs
    ep = axis_size(mesh, 'expert')
    _validate(num_experts=num_experts, k=k, capacity_factor=capacity_factor,
              dispatch=dispatch, routing_name=routing, balancing=balancing, ep=ep,
              group_size=group_size)
    if routing == 'expert_choice':   # fail now, not at the first call
      routing_lib.check_expert_choice(causal, allow_lookahead)
    self.d_model, self.num_experts, self.mesh = d_model, num_experts, mesh
    self.settings = _Settings(
        num_experts=num_experts, k=k, capacity_factor=capacity_factor,
        dispatch=dispatch, routing=routing, normalize_weights=normalize_weights,
        group_size=group_size, allow_lookahead=allow_lookahead or not causal,
        token_axes=(), ep=ep,
        apply=None, ragged_apply=None)
    self.balancing, self.bias_rate = balancing, bias_rate
    self.router = router or Router(d_model, num_experts, init_scale=init_scale,
                                   jitter=router_jitter, mesh=mesh, rngs=rngs)
    self.experts = experts or Experts(num_experts, d_model, d_ff, activation=activation,
                                      init_scale=init_scale, param_dtype=param_dtype,
                                      mesh=mesh, rngs=rngs)
    self.shared = None if not shared_d_ff else DenseFFN(
        d_model, shared_d_ff, activation=activation, init_scale=init_scale,
        param_dtype=param_dtype, mesh=mesh, rngs=rngs)

  def __call__(self, x: jax.Array, train: bool = False):
    if x.ndim != 3 or x.shape[-1] != self.d_model:
      raise ValueError(f'MoE input must be [B, L, D] with D={self.d_model}; got shape '
                       f'{tuple(x.shape)}. Reshape tokens to [batch, length, d_model].')
    axes = token_axes(self.mesh)
    shards = 1
    for a in axes:
      shards *= axis_size(self.mesh, a)
    if x.shape[0] % shards:
      raise ValueError(f'Batch size {x.shape[0]} must be divisible by the {shards} token '
                       f"shards of the mesh (axes {axes}); pad or resize the batch.")
    cfg = dataclasses.replace(self.settings, token_axes=axes if shards > 1 else (),
                               apply=self.experts.apply,
                               ragged_apply=self.experts.ragged_apply)
    logits = self.router(x, train=train)                                # f32[B, L, E]
    bias = self.router.bias[...] if self.balancing == 'loss_free' else None
    body = functools.partial(_routed, cfg=cfg)
    weights = self.experts.weights()
    args = (x, logits, weights, bias)
    if shards > 1:
      tok = P(axes)
      specs = (tok, tok, P('expert') if 'expert' in axes else P(), P())
      # Pin every input to its spec: with Explicit axes shard_map refuses mismatches.
      args = tuple(jax.tree.map(lambda a, sp=sp: reshard(a, self.mesh, sp), a)
                   for a, sp in zip(args, specs))
      body = jax.shard_map(body, mesh=self.mesh, in_specs=specs, out_specs=(tok, P()))
    y, stats = body(*args)
    aux = _aux(stats, logits, cfg)
    if train and self.balancing == 'loss_free':
      self.router.bias[...] = routing_lib.update_balance_bias(
          self.router.bias[...], stats['demand'], self.bias_rate)
    if self.shared is not None:
      y = y + self.shared(x)
    return y, aux


def _validate(*, num_experts, k, capacity_factor, dispatch, routing_name, balancing, ep,
              group_size):
  """Every constructor error, each naming the value and what is allowed."""
  if num_experts < 1:
    raise ValueError(f'num_experts={num_experts} must be >= 1.')
  if not 1 <= k <= num_experts:
    raise ValueError(f'k={k} must be between 1 and num_experts={num_experts}.')
  if not capacity_factor > 0:
    raise ValueError(f'capacity_factor={capacity_factor} must be > 0.')
  if dispatch not in dispatch_lib.BACKENDS:
    raise ValueError(f'dispatch={dispatch!r} is unknown; use one of {dispatch_lib.BACKENDS}.')
  if routing_name not in ROUTINGS:
    raise ValueError(f'routing={routing_name!r} is unknown; use one of {ROUTINGS}.')
  if balancing not in BALANCING:
    raise ValueError(f'balancing={balancing!r} is unknown; use one of {BALANCING}.')
  if num_experts % ep:
    raise ValueError(f'num_experts={num_experts} is not divisible by the mesh\'s expert '
                     f'axis size {ep}; use a multiple of {ep} experts or a smaller '
                     "'expert' axis.")
  if dispatch == 'dropless' and ep > 1:
    raise ValueError(f"dispatch='dropless' with an expert axis of {ep} needs "
                     'ragged_all_to_all, which this version does not implement (and '
                     "XLA:CPU lacks); use dispatch='index' or an expert axis of 1.")
  if dispatch == 'dropless' and routing_name == 'expert_choice':
    raise ValueError("dispatch='dropless' only serves routing='top_k'; expert choice "
                     "has a fixed capacity by construction, use dispatch='index'.")
  if group_size is not None and group_size < 1:
    raise ValueError(f'group_size={group_size} must be >= 1 (or None for all tokens '
                     'of a device).')


def _aux(stats, logits, cfg: _Settings) -> dict[str, jax.Array]:
  """Global routing metrics from the summed statistics of every device."""
  n = stats['tokens']
  demand = stats['demand'] / jnp.sum(stats['demand'])
  if cfg.routing == 'expert_choice':   # balanced by construction: nothing to penalise
    lb = jnp.zeros((), jnp.float32)
    demand = stats['kept'] / jnp.maximum(jnp.sum(stats['kept']), 1.0)
  else:
    lb = routing_lib.balance_loss_from_stats(stats['first_counts'], stats['prob_sum'], n)
  return {
      'load_balance_loss': lb,
      'router_z_loss': routing_lib.router_z_loss(logits),
      'dropped_fraction': 1.0 - jnp.sum(stats['kept']) / jnp.sum(stats['demand']),
      'expert_load': demand,
      'max_violation': routing_lib.max_violation(demand),
      'router_entropy': stats['entropy_sum'] / n,
  }
