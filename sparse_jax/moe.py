"""NNX mixture-of-experts layers: route -> dispatch -> exchange -> experts -> exchange -> combine.

Shape legend (the project's, docs/architecture.md): B batch, L length, D d_model, F d_ff,
E experts, K choices per token, G groups, S tokens per group, C capacity,
P expert-parallel degree (mesh axis 'expert').

The math lives in routing.py and dispatch.py; these modules hold parameters and wire the
pure functions together. With a mesh, the routed part runs in jax.shard_map: each
device routes its own tokens, and with P > 1 expert_parallel.py moves them to the
devices owning their experts and back (capacity: one all_to_all of the [E, G*C, D] slot
buffers each way; dropless: the transport `ep_transport` names).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from sparse_jax import dispatch as dispatch_lib
from sparse_jax import expert_parallel
from sparse_jax import grouped_matmul as gmm_lib
from sparse_jax import routing as routing_lib
from sparse_jax.layers import (DenseFFN, as_compute, check_activation, check_floating,
                               ffn, ffn_weight_names, weight)
from sparse_jax.roles import Role
from sparse_jax.sharding import axis_size, reshard, token_axes

ROUTINGS = ('top_k', 'expert_choice')
BALANCING = ('aux_loss', 'loss_free')
EXPERT_COMPUTE = ('loop', 'batched')


def default_expert_compute() -> str:
  """'loop' on XLA:CPU, which runs E plain matmuls faster than one batched matmul (about
  5% of the layer, experiments/bench_moe_layer.py); 'batched' on accelerators."""
  return 'loop' if jax.default_backend() == 'cpu' else 'batched'


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

  def param_roles(self) -> dict[str, Role]:
    return {'kernel': Role('router', 0)}

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    x = x.astype(jnp.float32)
    if train and self.jitter > 0:
      x = x * jax.random.uniform(self.rngs.jitter(), x.shape, jnp.float32,
                                 1.0 - self.jitter, 1.0 + self.jitter)
    return jnp.einsum('...d,de->...e', x, self.kernel[...])


class Experts(nnx.Module):
  """E feed-forward experts with stacked weights wi [E, D, F], wo [E, F, D]
  (swiglu adds wi_gate [E, D, F]). Expert e computes layers.ffn with its own weights.

  compute: 'loop' (one plain matmul per expert) or 'batched' (one batched matmul); both
  give the same function, and default_expert_compute() picks per platform.
  grouped_matmul, block_size: how the dropless backend runs the experts on rows sorted
  by expert (grouped_matmul.grouped_ffn; default_grouped_matmul() picks per platform).

  To add an expert type, subclass and override `weights` and `apply` (and
  `grouped_apply` for the dropless backend): both are pure functions of `weights()`,
  whose arrays keep the leading expert axis that expert parallelism shards over 'expert'.
  """

  def __init__(self, num_experts: int, d_model: int, d_ff: int, *,
               activation: str = 'gelu', init_scale: float = 1.0,
               param_dtype=jnp.float32, compute: str | None = None,
               grouped_matmul: str | None = None, block_size: int = 64,
               mesh: Mesh | None = None, rngs: nnx.Rngs):
    check_activation(activation)
    compute = compute or default_expert_compute()
    if compute not in EXPERT_COMPUTE:
      raise ValueError(f'compute={compute!r} is unknown; use one of {EXPERT_COMPUTE}.')
    grouped_matmul = grouped_matmul or gmm_lib.default_grouped_matmul()
    gmm_lib.check_grouped_matmul(grouped_matmul, block_size)
    self.activation, self.compute = activation, compute
    self.grouped_matmul, self.block_size = grouped_matmul, block_size
    for name in ffn_weight_names(activation):
      shape = (num_experts, d_ff, d_model) if name == 'wo' else (num_experts, d_model, d_ff)
      setattr(self, name, weight(rngs.params(), shape, init_scale=init_scale,
                                 dtype=param_dtype, mesh=mesh, names=('expert', None, None)))

  def weights(self) -> dict[str, jax.Array]:
    """Arrays with a leading expert axis [E, ...]; the input of apply()."""
    return {n: getattr(self, n)[...] for n in ffn_weight_names(self.activation)}

  def param_roles(self) -> dict[str, Role]:
    """wi (wi_gate), wo: stacked expert kernels [E, in, out]. A subclass names the roles
    of the parameters it adds (unnamed ones are 'other': counted, never pruned)."""
    return {n: Role('expert', 1) for n in ffn_weight_names(self.activation)}

  def apply(self, w: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    """x [E, N, D] -> [E, N, D], expert e on row block e."""
    f = functools.partial(ffn, activation=self.activation)
    if self.compute == 'loop':
      return jnp.stack([f(jax.tree.map(lambda a, i=i: a[i], w), x[i])
                        for i in range(x.shape[0])])
    return jax.vmap(f)(w, x)

  def grouped_apply(self, w: dict[str, jax.Array], x: jax.Array, group_sizes: jax.Array,
                    *, keep_hidden: bool = False) -> jax.Array:
    """x [N, D] sorted by expert, group_sizes i32[E] -> [N, D] (rows past the groups: 0).
    keep_hidden: see grouped_matmul.grouped_ffn."""
    return gmm_lib.grouped_ffn(w, x, group_sizes, activation=self.activation,
                               impl=self.grouped_matmul, block_size=self.block_size,
                               keep_hidden=keep_hidden)


@dataclasses.dataclass(frozen=True)
class _Settings:
  """The routed body's static settings (hashable; closed over by shard_map)."""
  num_experts: int
  k: int
  capacity_factor: float
  dispatch: str
  routing: str
  normalize_weights: bool
  group_size: int | None
  token_axes: tuple[str, ...]                 # mesh axes the tokens are split over
  ep: int                                     # size of mesh axis 'expert'
  ep_transport: str                           # dropless with ep > 1 (expert_parallel.py)
  score: str = 'softmax'                      # router probabilities: softmax | sigmoid
  groups: tuple[int, int] | None = None       # (n_group, topk_group) group-limited top-k
  scale: float = 1.0                          # routed_scaling_factor


def _route_groups(st: _Settings, logits: jax.Array, bias: jax.Array | None):
  """Route G groups: logits f32[G, S, E] -> (RoutingPlan with fields [G, S, K], C)."""
  s, e, k = logits.shape[1], st.num_experts, st.k
  if st.routing == 'expert_choice':
    c = routing_lib.capacity(s, e, k, st.capacity_factor)
    route = functools.partial(routing_lib.route_expert_choice, capacity=c)
  else:
    # Dropless keeps every choice: no expert can be asked for more than S slots.
    c = s if st.dispatch == 'dropless' else routing_lib.capacity(s, e, k, st.capacity_factor)
    route = functools.partial(routing_lib.route_top_k, k=k, capacity=c,
                              normalize_weights=st.normalize_weights, bias=bias,
                              score=st.score, groups=st.groups, scale=st.scale)
  return jax.vmap(route)(logits), c


def _group(st: _Settings, tokens: int) -> int:
  s = st.group_size or tokens
  if tokens % s:
    raise ValueError(f'group_size={s} must divide the {tokens} tokens each device holds.')
  return s


def _routed(x, logits, weights, bias, *, st: _Settings, apply: Callable,
            grouped_apply: Callable):
  """The routed FFN on the tokens one device holds.

  x [B, L, D], logits f32[B, L, E], weights {name: [E/P, ...]}, bias f32[E].
  Returns y [B, L, D] and additive routing statistics summed over all devices.
  """
  b, l, d = x.shape
  e = st.num_experts
  s = _group(st, b * l)
  g = b * l // s
  xg, lg = x.reshape(g, s, d), logits.reshape(g, s, e)                  # [G, S, *]
  plan, c = _route_groups(st, lg, bias)                                # [G, S, K]
  if st.dispatch == 'dropless':
    flat = routing_lib.RoutingPlan(*(f.reshape(g * s, -1) for f in plan))
    run = functools.partial(grouped_apply, weights)
    if st.ep == 1:
      # The sorted buffer holds only routed rows: keeping the pre-activations is cheaper
      # than recomputing them (grouped_matmul.py); transports' buffers are mostly empty.
      y = dispatch_lib.dropless(xg.reshape(g * s, d), flat, e,
                                functools.partial(run, keep_hidden=True))
    else:
      y = expert_parallel.dropless(st.ep_transport, xg.reshape(g * s, d), flat, e, st.ep,
                                   run, capacity_factor=st.capacity_factor,
                                   apply=functools.partial(apply, weights))
  else:
    backend = dispatch_lib.CAPACITY_BACKENDS[st.dispatch]
    send, ctx = backend.dispatch(xg, plan, e, c)                       # [E, G*C, D]
    exchange = expert_parallel.exchange
    out = exchange(apply(weights, exchange(send, st.ep)), st.ep, back=True)
    y = backend.combine(out, plan, ctx)                                # [G, S, D]
  stats = routing_lib.routing_stats(lg, plan)
  if st.token_axes:
    stats = jax.lax.psum(stats, st.token_axes)
  return y.reshape(b, l, d).astype(x.dtype), stats


def generate_path(tokens: int, k: int, num_experts: int, ep: int = 1) -> str:
  """Which dropless path MoE.generate takes for `tokens` tokens of top-`k` routing:
  'chosen' (dispatch.chosen_experts) or 'dropless' (the layer's dropless path). Gathering
  the T*K chosen experts' weights writes a copy that the matmul reads again, about twice
  the bytes of reading them in place, so the grouped path over all E is cheaper once
  2*T*K >= E (bench_decode.py's decode-path table); an expert axis keeps the experts where
  they are."""
  return 'chosen' if ep == 1 and 2 * tokens * k < num_experts else 'dropless'


class MoE(nnx.Module):
  """Routed mixture-of-experts FFN. x [B, L, D] -> (y [B, L, D], aux).

  Args (beyond d_model, d_ff, num_experts, k, capacity_factor, dispatch, activation,
  mesh, rngs):
    routing: 'top_k' (token choice) or 'expert_choice' (non-causal; see routing.py).
    normalize_weights: renormalise the K weights; default k >= 2.
    group_size: tokens per routing group; default all tokens one device holds.
    causal: the layer sits in a causal model, where expert choice is refused unless
      allow_lookahead=True says the leak of future tokens is intended.
    balancing: 'aux_loss' (return the Switch loss for the trainer to weight) or
      'loss_free' (also update a selection bias in training, rate `bias_rate`).
    router_jitter: Switch's input jitter (training only).
    init_scale, router_init_scale: weight init scales of the experts (and shared
      expert) and of the router (default: init_scale).
    shared_d_ff: width of an always-on shared expert beside the routed ones.
    shared_gate: scale the shared expert's output by sigmoid(x @ shared_gate), a learned
      [D, 1] gate (Qwen2-MoE); without it the output is simply added (DeepSeek).
    router_score: 'softmax' or 'sigmoid' router probabilities; n_group, topk_group:
      group-limited selection (routing.limit_groups; 1, 1 is none); routed_scale: a
      factor on the combine weights (DeepSeek-V3: sigmoid, 8 groups, 4 kept, 2.5).
    expert_compute: 'loop' | 'batched' | None (default_expert_compute()).
    grouped_matmul, block_size: how dropless runs the experts (grouped_matmul.grouped_ffn),
      'blocked' | 'ragged_dot' | None (grouped_matmul.default_grouped_matmul()), and the
      blocked one's window rows.
    ep_transport: how dropless dispatch moves rows over an expert axis > 1:
      'all_to_all' (default: worst-case buffers) | 'sized' (capacity dispatch at
      capacity_factor, and the choices past capacity in one more exchange sized to
      them) | 'all_gather' | 'ragged' | 'ragged_reference' (see expert_parallel.py).
      Capacity dispatch always uses one all_to_all each way.
    router, experts: modules to use instead of the defaults (docs/extending.md).

  aux (all float32, statistics over the global batch): router_z_loss,
  routing.routing_metrics (load_balance_loss, dropped_fraction, expert_load [E],
  max_violation, router_entropy), and 'stats', the additive routing.routing_stats they
  come from (sum them over micro-batches for whole-step metrics).

  The router and its statistics are float32 whatever x's dtype; the experts compute in
  x's dtype, which must be floating (integer x is a TypeError: cast it to the
  parameters' dtype first). An x without tokens (B or L = 0) is a ValueError.

  A token with a NaN or inf feature is contained: it is routed nowhere (routing.py), its
  output is non-finite, and the other tokens' outputs, and the gradients of a loss over
  them only, stay finite in every dispatch backend. aux's statistics over all tokens
  (load_balance_loss, router_z_loss, router_entropy) may be NaN then: expected, not a
  leak, and it shows the fault in training.
  """

  def __init__(self, d_model: int, d_ff: int, num_experts: int, *, k: int = 1,
               capacity_factor: float = 1.25, dispatch: str = 'index',
               activation: str = 'gelu', mesh: Mesh | None = None,
               rngs: nnx.Rngs | None = None, routing: str = 'top_k',
               normalize_weights: bool | None = None, group_size: int | None = None,
               causal: bool = False, allow_lookahead: bool = False,
               balancing: str = 'aux_loss', bias_rate: float = 1e-3,
               router_jitter: float = 0.0, init_scale: float = 1.0,
               router_init_scale: float | None = None, shared_d_ff: int | None = None,
               param_dtype=jnp.float32, expert_compute: str | None = None,
               grouped_matmul: str | None = None, block_size: int = 64,
               ep_transport: str = 'all_to_all', shared_gate: bool = False,
               router_score: str = 'softmax', n_group: int = 1, topk_group: int = 1,
               routed_scale: float = 1.0, router: nnx.Module | None = None, experts: nnx.Module | None = None):
    rngs = nnx.Rngs(0) if rngs is None else rngs
    ep = axis_size(mesh, 'expert')
    _validate(num_experts=num_experts, k=k, capacity_factor=capacity_factor,
              dispatch=dispatch, routing_name=routing, balancing=balancing, ep=ep,
              group_size=group_size)
    expert_parallel.check_transport(ep_transport, _platform(mesh))
    routing_lib.check_groups(num_experts, k, router_score, n_group, topk_group)
    if routing == 'expert_choice':
      routing_lib.check_expert_choice(causal, allow_lookahead)
    axes = token_axes(mesh)
    self.shards = math.prod(axis_size(mesh, a) for a in axes)
    self.d_model, self.num_experts, self.mesh = d_model, num_experts, mesh
    self.settings = _Settings(
        num_experts=num_experts, k=k, capacity_factor=capacity_factor,
        dispatch=dispatch, routing=routing,
        normalize_weights=k >= 2 if normalize_weights is None else normalize_weights,
        group_size=group_size, token_axes=axes if self.shards > 1 else (), ep=ep,
        ep_transport=ep_transport, score=router_score,
        groups=(n_group, topk_group) if n_group > 1 else None, scale=routed_scale)
    self.balancing, self.bias_rate = balancing, bias_rate
    self.router = router or Router(
        d_model, num_experts, jitter=router_jitter, mesh=mesh, rngs=rngs,
        init_scale=init_scale if router_init_scale is None else router_init_scale)
    self.experts = experts or Experts(num_experts, d_model, d_ff, activation=activation,
                                      init_scale=init_scale, param_dtype=param_dtype,
                                      compute=expert_compute,
                                      grouped_matmul=grouped_matmul, block_size=block_size,
                                      mesh=mesh, rngs=rngs)
    self.shared = None if not shared_d_ff else DenseFFN(
        d_model, shared_d_ff, activation=activation, init_scale=init_scale,
        param_dtype=param_dtype, mesh=mesh, kind='shared', rngs=rngs)
    if shared_gate and not shared_d_ff:
      raise ValueError('shared_gate=True gates the shared expert: pass shared_d_ff > 0.')
    self.shared_gate = weight(rngs.params(), (d_model, 1), init_scale=init_scale,
                              dtype=param_dtype, names=(None, None),
                              mesh=mesh) if shared_gate else None

  def param_roles(self) -> dict[str, Role]:
    return {} if self.shared_gate is None else {'shared_gate': Role('gate', 0)}

  def routing_metrics(self, stats: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """routing.routing_metrics of (summed) statistics of this layer."""
    return routing_lib.routing_metrics(
        stats, expert_choice=self.settings.routing == 'expert_choice')

  def update_bias(self, demand: jax.Array) -> None:
    """One loss-free balancing step from choice counts f32[E] (no-op for aux_loss).
    A training call does it with its own counts; a trainer that accumulates several
    micro-batches discards those and calls this once with the step's counts."""
    if self.balancing == 'loss_free':
      self.router.bias[...] = routing_lib.update_balance_bias(
          self.router.bias[...], demand, self.bias_rate)

  def _check_input(self, x):
    check_floating(x, 'MoE')
    if x.ndim != 3 or x.shape[-1] != self.d_model:
      raise ValueError(f'MoE input must be [B, L, D] with D={self.d_model}; got shape '
                       f'{tuple(x.shape)}. Reshape tokens to [batch, length, d_model].')
    if not x.shape[0] or not x.shape[1]:
      raise ValueError(f'MoE input of shape {tuple(x.shape)} has no tokens; pass a batch '
                       'with B >= 1 and L >= 1.')
    if x.shape[0] % self.shards:
      raise ValueError(f'Batch size {x.shape[0]} must be divisible by the {self.shards} '
                       f'token shards of the mesh (axes {token_axes(self.mesh)}); pad or '
                       'resize the batch.')

  def _bias(self):
    return self.router.bias[...] if self.balancing == 'loss_free' else None

  def _logits(self, x, train):
    """(ok bool[B, L, 1], x with the non-finite tokens zeroed, logits f32[B, L, E]).

    A token with a NaN/inf feature enters no matmul with a parameter, whose gradient
    (x^T dy: 0 * NaN) it would poison whole. Its logits are non-finite, so routing sends
    it nowhere (routing.router_probs).
    """
    ok = jnp.all(jnp.isfinite(x), axis=-1, keepdims=True)
    clean = jnp.where(ok, x, 0)
    return ok, clean, jnp.where(ok, self.router(clean, train=train), _non_finite(x))

  def route(self, x: jax.Array, *, train: bool = False):
    """The plan this layer uses for x [B, L, D]: (RoutingPlan with fields [G, S, K], C).

    Groups are those the layer routes (the tokens each device holds, or group_size), in
    row-major [B, L] order; with a mesh this computes on the global batch.
    """
    self._check_input(x)
    b, l, _ = x.shape
    s = _group(self.settings, b // self.shards * l)
    logits = self._logits(x, train)[2].reshape(-1, s, self.num_experts)
    return _route_groups(self.settings, logits, self._bias())

  def __call__(self, x: jax.Array, train: bool = False):
    self._check_input(x)
    ok, clean, logits = self._logits(x, train)                          # f32[B, L, E]
    y, stats = self._run_experts(self.settings, clean, logits)
    aux = {'router_z_loss': routing_lib.router_z_loss(logits),
           **self.routing_metrics(stats), 'stats': stats}
    if train:
      self.update_bias(stats['demand'])
    return jnp.where(ok, self._add_shared(y, clean), _non_finite(x)), aux

  def generate(self, x: jax.Array) -> jax.Array:
    """y [B, L, D] while generating: dropless top-k with the trained router and experts,
    whatever dispatch the layer trains with, so no choice is ever dropped. A few tokens
    (decoding) run only their chosen experts' weights (dispatch.chosen_experts); more run
    the dropless grouped path, on an expert axis its dropless transport (generate_path)."""
    self._check_input(x)
    if self.settings.routing == 'expert_choice':
      raise ValueError("routing='expert_choice' picks tokens per expert over the whole "
                       'sequence: it cannot generate one token at a time; generate with a '
                       "token-choice (routing='top_k') model.")
    st = dataclasses.replace(self.settings, dispatch='dropless', group_size=None)
    ok, clean, logits = self._logits(x, False)
    b, l, d = x.shape
    if generate_path(b * l, st.k, st.num_experts, st.ep) == 'chosen':
      plan, _ = _route_groups(st, logits.reshape(1, b * l, -1), self._bias())
      plan = routing_lib.RoutingPlan(*(f[0] for f in plan))             # [T, K]
      y = dispatch_lib.chosen_experts(clean.reshape(b * l, d), plan, self.experts.weights(),
                                      self.experts.apply).reshape(b, l, d).astype(x.dtype)
    else:
      y, _ = self._run_experts(st, clean, logits)
    return jnp.where(ok, self._add_shared(y, clean), _non_finite(x))

  def _run_experts(self, st: _Settings, clean, logits):
    """(y [B, L, D], routing statistics) of the routed experts, on the mesh."""
    body = functools.partial(_routed, st=st, apply=self.experts.apply,
                             grouped_apply=self.experts.grouped_apply)
    args = (clean, logits, self.experts.weights(), self._bias())
    if st.token_axes:
      tok = P(st.token_axes)
      specs = (tok, tok, P('expert') if st.ep > 1 else P(), P())
      # Pin every input to its spec: with Explicit axes shard_map refuses mismatches.
      args = tuple(jax.tree.map(lambda a, sp=sp: reshard(a, self.mesh, sp), a)
                   for a, sp in zip(args, specs))
      body = jax.shard_map(body, mesh=self.mesh, in_specs=specs, out_specs=(tok, P()))
    return body(*args)

  def _add_shared(self, y, clean):
    if self.shared is None:
      return y
    shared = self.shared(clean)
    if self.shared_gate is not None:
      shared = shared * jax.nn.sigmoid(
          jnp.einsum('bld,do->blo', clean, as_compute(self.shared_gate[...], clean)))
    return y + shared


def _non_finite(x):
  """[..., 1]: non-finite (NaN or inf) where the row x [..., D] is, computed from x: a NaN
  constant in its place may be folded into finite garbage by XLA:CPU's fused exp."""
  return jnp.sum(x, axis=-1, keepdims=True)


def _platform(mesh: Mesh | None) -> str:
  return mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()


def _validate(*, num_experts, k, capacity_factor, dispatch, routing_name, balancing, ep,
              group_size):
  """Every constructor error, each naming the value and what is allowed."""
  if num_experts < 1:
    raise ValueError(f'num_experts={num_experts} must be >= 1.')
  if not 1 <= k <= num_experts:
    raise ValueError(f'k={k} must be between 1 and num_experts={num_experts}.')
  routing_lib.check_capacity_factor(capacity_factor)
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
  if dispatch == 'dropless' and routing_name == 'expert_choice':
    raise ValueError("dispatch='dropless' only serves routing='top_k'; expert choice "
                     "has a fixed capacity by construction, use dispatch='index'.")
  if group_size is not None and group_size < 1:
    raise ValueError(f'group_size={group_size} must be >= 1 (or None for all tokens '
                     'of a device).')
