"""Moving routed rows between the devices that hold tokens and those that hold experts.

Runs inside jax.shard_map over the mesh axis 'expert' of size P; each device holds S
tokens and E/P experts (its experts are [p*E/P, (p+1)*E/P) on axis index p).
Shape legend: S tokens on this device, K choices per token, E experts, P devices on
'expert', C capacity, D d_model, R = S * min(K, E/P) rows (the most one device can ever
send to another: a token's K choices are distinct experts).

Capacity dispatch: `exchange` moves the [E, G*C, D] slot buffers, one all_to_all each way.

Dropless dispatch, one semantics (every kept choice computed, outputs and gradients
equal to the single-device layer) and four transports plus a reference (TRANSPORTS):

  'all_to_all'  each device sends every destination a buffer of R rows (the static
                worst case, so nothing can overflow) and the rows' local expert ids;
                the receiver runs its experts on the rows it got and sends them back.
                Forward: 3 all_to_all (rows, ids, results).
  'sized'       capacity dispatch at the layer's capacity factor ([E, C, D] slot
                buffers, C = ceil(cf * S*K/E)) for the choices that fit, and the
                choices past capacity in one 'all_to_all' exchange whose buffers are
                the smallest of E/P*C/4, twice that, ... up to R rows that holds what
                every device of the axis has for one destination (the count is
                max-reduced over 'expert' and chooses the branch of one lax.switch;
                none when nothing is past capacity). Nothing is ever dropped, a step
                without overflow costs what capacity dispatch costs, and one with
                a little overflow a small exchange more (switch_keeping_residuals
                keeps the other branches' residuals out of the step). Forward: 2
                all_to_all and one pmax; 3 all_to_all more when something spills.
  'all_gather'  the ring-of-experts form: all-gather the tokens and their routing over
                'expert', run the local experts on the choices that name them, and
                psum_scatter the partial outputs home. Forward: all-gathers of tokens,
                expert ids and weights, one reduce-scatter.
  'ragged'      jax.lax.ragged_all_to_all moves only the rows that exist into the same
                receive layout as 'all_to_all'. Needs a platform that implements it
                (not XLA:CPU). Forward: one all_to_all of counts, 3 ragged_all_to_all.
  'ragged_reference'  'ragged' with ragged_all_to_all_reference, the collective's
                semantics written with all_to_all, in place of the collective: runs
                everywhere and moves full-size buffers. It tests the ragged transport's
                logic where the platform lacks the collective; it is not for speed.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from sparse_jax import dispatch as dispatch_lib
from sparse_jax.routing import RoutingPlan, capacity, queue_positions
from sparse_jax.sharding import vary, varying_axes

TRANSPORTS = ('all_to_all', 'sized', 'all_gather', 'ragged', 'ragged_reference')
AXIS = 'expert'


def check_transport(transport: str, platform: str) -> None:
  """Raise ValueError for an unknown transport or 'ragged' where the platform lacks it."""
  if transport not in TRANSPORTS:
    raise ValueError(f'ep_transport={transport!r} is unknown; use one of {TRANSPORTS}.')
  if transport == 'ragged' and platform == 'cpu':
    raise ValueError("ep_transport='ragged' needs jax.lax.ragged_all_to_all, which XLA:CPU "
                     "does not implement; use ep_transport='all_to_all' (the default), 'sized' "
                     "or 'all_gather'.")


# --------------------------------------------------------------------------- capacity

def exchange(buf: jax.Array, ep: int, *, back: bool = False) -> jax.Array:
  """Capacity slot buffers between token devices and expert devices.

  forward: [E, N, D] slots of local tokens -> [E/P, P*N, D] rows for local experts.
  back:    the inverse. With P > 1 each direction is exactly one all_to_all.
  """
  if ep == 1:
    return buf
  if not back:
    e, n, d = buf.shape
    # Chunk p of [P, E/P, N, D] goes to device p; received chunks stack by source.
    buf = jax.lax.all_to_all(buf.reshape(ep, e // ep, n, d), AXIS, 0, 0)
    return buf.transpose(1, 0, 2, 3).reshape(e // ep, ep * n, d)
  el, pn, d = buf.shape
  buf = buf.reshape(el, ep, pn // ep, d).transpose(1, 0, 2, 3)         # [P, E/P, N, D]
  return jax.lax.all_to_all(buf, AXIS, 0, 0).reshape(ep * el, pn // ep, d)


# --------------------------------------------------------------------------- dropless

GroupedFn = Callable[[jax.Array, jax.Array], jax.Array]


def worst_case_rows(tokens: int, k: int, num_experts: int, ep: int) -> int:
  """R: the most rows one device can send to one other, S * min(K, E/P)."""
  return tokens * min(k, num_experts // ep)


def _local_rows(rows, ids, local_experts, grouped_fn):
  """Run the local experts on received rows [N, D] with local ids i32[N] (local_experts
  where a row is empty): y[i] = ffn_{ids[i]}(rows[i])."""
  ones = (ids >= 0).astype(jnp.float32)[:, None]     # from ids: varies over the mesh as ids do
  return dispatch_lib.sorted_apply(rows, ids[:, None], ones, local_experts, grouped_fn)


def dropless_all_to_all(x: jax.Array, plan: RoutingPlan, num_experts: int, ep: int,
                        grouped_fn: GroupedFn, rows: int | None = None) -> jax.Array:
  """x [S, D], plan [S, K] (global expert ids) -> y [S, D]; grouped_fn runs the E/P
  local experts. rows: the buffer per destination (default R; fewer rows than a device
  sends one destination would drop choices, which dropless_sized never lets happen)."""
  s, k = plan.expert.shape
  el = num_experts // ep
  r = rows or worst_case_rows(s, k, num_experts, ep)
  # The destination device plays the expert in a capacity dispatch of capacity R.
  dest = plan.expert // el
  to_device = RoutingPlan(expert=dest, weight=plan.weight, kept=plan.kept,
                          slot=queue_positions(dest, ep, plan.kept))
  send, m = dispatch_lib.index_dispatch(x, to_device, ep, r)           # [P, R, D]
  ids = jnp.where(m.filled, plan.expert.reshape(-1)[m.choice] % el, el)    # i32[P*R]
  got = jax.lax.all_to_all(send, AXIS, 0, 0)                           # [P, R, D] by source
  got_ids = jax.lax.all_to_all(ids.reshape(ep, r), AXIS, 0, 0)
  out = _local_rows(got.reshape(ep * r, -1), got_ids.reshape(-1), el, grouped_fn)
  back = jax.lax.all_to_all(out.reshape(ep, r, -1), AXIS, 0, 0)
  return dispatch_lib.index_combine(back, to_device, m)


def dropless_sized(x: jax.Array, plan: RoutingPlan, num_experts: int, ep: int,
                   grouped_fn: GroupedFn, *, factor: float, apply: Callable) -> jax.Array:
  """Capacity dispatch at capacity factor `factor` for the choices that fit its C slots,
  and one exchange as small as suffices for those past them (spill_rows); same
  contract as dropless_all_to_all. apply: the local experts on [E/P, N, D] row blocks
  (Experts.apply with its weights)."""
  s, k = plan.expert.shape
  el = num_experts // ep
  c = capacity(s, num_experts, k, factor)
  fits, past, need = past_capacity(plan, num_experts, ep, c)
  send, m = dispatch_lib.index_dispatch(x, fits, num_experts, c)        # [E, C, D]
  y = dispatch_lib.index_combine(exchange(apply(exchange(send, ep)), ep, back=True),
                                 fits, m)
  if c >= s:                                      # no expert can get more than S rows
    return y
  sizes = spill_rows(el * c, worst_case_rows(s, k, num_experts, ep))
  # Branch 0 sends nothing; branch i the spill in buffers of sizes[i - 1] rows.
  branch = jnp.sum(need > jnp.asarray((0,) + sizes[:-1]))
  none = lambda x, past: _zeros_like(jax.typeof(y))
  spill = lambda rows: lambda x, past: dropless_all_to_all(x, past, num_experts, ep,
                                                           grouped_fn, rows=rows)
  return y + switch_keeping_residuals(branch, [none] + [spill(r) for r in sizes], x, past)


def spill_rows(capacity_rows: int, worst: int) -> tuple[int, ...]:
  """The buffer sizes (rows per destination) 'sized' may send the choices past capacity
  in: a quarter of what capacity sends one device (E/P * C), doubling up to the worst
  case R, so a step sends at most twice the rows it needs (or R)."""
  sizes = [max(1, capacity_rows // 4)]
  while sizes[-1] < worst:
    sizes.append(min(2 * sizes[-1], worst))
  return tuple(sizes)


def past_capacity(plan: RoutingPlan, num_experts: int, ep: int, c: int):
  """(plan's kept choices that fit c slots of their expert's queue on this device, those
  past them, i32[] the most past-capacity choices any device of the 'expert' axis has
  for one destination device). The last is the max over the axis, so every device that
  exchanges rows takes the same branch."""
  slot = queue_positions(plan.expert, num_experts, plan.kept)   # plan's: per routing group
  fits = plan.kept & (slot < c)
  past = plan.kept & ~fits
  per_device = jnp.zeros((ep,), jnp.int32).at[plan.expert.reshape(-1) // (num_experts // ep)
                                              ].add(past.reshape(-1).astype(jnp.int32))
  return (plan._replace(slot=slot, kept=fits), plan._replace(slot=slot, kept=past),
          jax.lax.pmax(per_device.max(), AXIS))


def switch_keeping_residuals(index: jax.Array, branches: list[Callable], *args):
  """lax.switch(index, branches, *args), differentiated so that branches[0], the common
  one, keeps the residuals its forward saved for its backward, and every other branch
  recomputes its forward inside its backward.

  jax.lax.switch's own rule (jax 0.10) makes whichever branch runs return the residuals
  of every branch, zeros for the others: a 'sized' step that sends nothing past capacity
  would allocate and fill the spill exchanges' residuals too (a 'sized' built on
  lax.cond's rule took 2.00x the capacity all-to-all's time, bench_moe_layer.py at
  8c422ab).

  The floating leaves of args are differentiated, the others (integer routing) are not.
  The branches may close over floating arrays (expert weights), never over integer
  ones: pass those in args.
  """
  leaves, tree = jax.tree.flatten(args)
  floating = [jnp.issubdtype(l.dtype, jnp.inexact) for l in leaves]
  # Closed-over floats (expert weights) become inputs, as custom_vjp needs.
  converted = [jax.closure_convert(b, *args) for b in branches]
  consts = list({id(c): c for _, cs in converted for c in cs}.values())
  where = [id(c) for c in consts]

  def bind(f, sub):
    idx = [where.index(id(c)) for c in sub]
    def g(fl, other, c):
      fl, other = iter(fl), iter(other)
      a = tree.unflatten([next(fl) if f_ else next(other) for f_ in floating])
      return f(*a, *(c[i] for i in idx))
    return g

  fns = [bind(f, cs) for f, cs in converted]
  common_vjp = []                   # the common vjp's (structure, residual types)

  @jax.custom_vjp
  def run(index, fl, other, c):
    return jax.lax.switch(index, fns, fl, other, c)

  def common_fwd(fl, other, c):
    y, vjp = jax.vjp(lambda fl, c: fns[0](fl, other, c), fl, c)
    res, vjp_tree = jax.tree.flatten(vjp)
    common_vjp[:] = [vjp_tree, [jax.typeof(r) for r in res]]
    return y, res

  def fwd(index, fl, other, c):
    jax.eval_shape(common_fwd, fl, other, c)                   # fills common_vjp
    rare = lambda f: lambda fl, other, c: (f(fl, other, c),
                                           [_zeros_like(t) for t in common_vjp[1]])
    y, res = jax.lax.switch(index, [common_fwd] + [rare(f) for f in fns[1:]], fl, other, c)
    return y, (index, fl, other, c, res)

  def bwd(saved, g):
    index, fl, other, c, res = saved
    common = lambda fl, other, c, res: common_vjp[0].unflatten(res)(g)
    rare = lambda f: lambda fl, other, c, res: jax.vjp(
        lambda fl, c: f(fl, other, c), fl, c)[1](g)
    d_fl, d_c = jax.lax.switch(index, [common] + [rare(f) for f in fns[1:]],
                               fl, other, c, res)
    return None, d_fl, [None] * len(other), d_c

  run.defvjp(fwd, bwd)
  split = lambda keep: [l for l, f in zip(leaves, floating) if f == keep]
  return run(index, split(True), split(False), consts)


def _zeros_like(aval):
  """Zeros of aval's shape, dtype and varying mesh axes (shard_map's check_vma asks every
  branch of a switch for the same)."""
  return vary(jnp.zeros(aval.shape, aval.dtype), varying_axes(aval))


def dropless_all_gather(x: jax.Array, plan: RoutingPlan, num_experts: int, ep: int,
                        grouped_fn: GroupedFn) -> jax.Array:
  """The ring-of-experts form; same contract as dropless_all_to_all."""
  s, k = plan.expert.shape
  el = num_experts // ep
  gather = lambda a: jax.lax.all_gather(a, AXIS, axis=0, tiled=True)
  key = jnp.where(plan.kept, plan.expert, num_experts)                 # E: not computed
  all_x, all_key, all_weight = gather(x), gather(key), gather(plan.weight)   # [P*S, ...]
  first = jax.lax.axis_index(AXIS) * el
  mine = (all_key >= first) & (all_key < first + el)
  local_key = jnp.where(mine, all_key - first, el)
  partial = dispatch_lib.sorted_apply(all_x, local_key, all_weight, el, grouped_fn,
                                      num_slots=ep * worst_case_rows(s, k, num_experts, ep))
  return jax.lax.psum_scatter(partial, AXIS, scatter_dimension=0, tiled=True)


def dropless_ragged(x: jax.Array, plan: RoutingPlan, num_experts: int, ep: int,
                    grouped_fn: GroupedFn,
                    ragged_all_to_all: Callable = jax.lax.ragged_all_to_all) -> jax.Array:
  """Rows sorted by destination, only the existing ones sent; same contract as
  dropless_all_to_all. ragged_all_to_all is the collective (the reference one in CPU
  tests)."""
  s, k = plan.expert.shape
  el, r = num_experts // ep, worst_case_rows(s, k, num_experts, ep)
  key = jnp.where(plan.kept, plan.expert // el, ep)                    # destination device
  m, sizes = dispatch_lib.sort_map(key, ep)
  send = dispatch_lib.gather_to_slots(x, m)                           # [S*K, D] by device
  ids = jnp.where(m.filled, plan.expert.reshape(-1)[m.choice] % el, el)
  starts = jnp.cumsum(sizes) - sizes
  # Device p writes its rows for device j at j's region p*R, the all_to_all layout.
  me = jax.lax.axis_index(AXIS)
  to_region = jnp.full((ep,), me * r, jnp.int32)
  counts = jax.lax.all_to_all(jnp.stack([sizes, starts], 1), AXIS, 0, 0)   # [P, 2] by source
  got_sizes, their_starts = counts[:, 0], counts[:, 1]
  move = lambda a, out: ragged_all_to_all(a, out, starts, sizes, to_region, got_sizes,
                                          axis_name=AXIS)
  got = move(send, jnp.zeros((ep * r,) + send.shape[1:], send.dtype))
  got_ids = move(ids, jnp.full((ep * r,), el, ids.dtype))
  out = _local_rows(got, got_ids, el, grouped_fn)
  regions = jnp.arange(ep, dtype=jnp.int32) * r
  back = ragged_all_to_all(out, jnp.zeros_like(send), regions, got_sizes, their_starts,
                           sizes, axis_name=AXIS)                      # [S*K, D] by device
  return dispatch_lib.gather_from_slots(back, plan.weight.astype(jnp.float32), m)


def ragged_all_to_all_reference(operand, output, input_offsets, send_sizes,
                                output_offsets, recv_sizes, *, axis_name):
  """jax.lax.ragged_all_to_all's semantics (one slice per peer) from all_to_all, for
  platforms without it: every slice travels in a buffer of operand's full length."""
  p = input_offsets.shape[0]
  n = operand.shape[0]
  rows = jnp.arange(n)
  pad = lambda a: jnp.concatenate([a, jnp.zeros_like(a)])             # windows stay inside
  src = pad(operand)
  chunks = jnp.stack([jnp.where(
      (rows < send_sizes[j]).reshape((n,) + (1,) * (operand.ndim - 1)),
      jax.lax.dynamic_slice_in_dim(src, input_offsets[j], n, 0), 0) for j in range(p)])
  got = jax.lax.all_to_all(chunks, axis_name, 0, 0)                    # [P, n, ...] by source
  where = jax.lax.all_to_all(output_offsets, axis_name, 0, 0)
  m = output.shape[0]
  result = jnp.concatenate([output, jnp.zeros((n,) + output.shape[1:], output.dtype)])
  for i in range(p):
    old = jax.lax.dynamic_slice_in_dim(result, where[i], n, 0)
    new = jnp.where((rows < recv_sizes[i]).reshape((n,) + (1,) * (output.ndim - 1)),
                    got[i], old)
    result = jax.lax.dynamic_update_slice_in_dim(result, new, where[i], 0)
  return result[:m]


def dropless(transport: str, x: jax.Array, plan: RoutingPlan, num_experts: int, ep: int,
             grouped_fn: GroupedFn, *, capacity_factor: float, apply: Callable) -> jax.Array:
  """The layer's exchange by `transport` (TRANSPORTS); 'sized' also takes the capacity
  factor and the local experts' apply (dropless_sized), the others ignore them."""
  kw = {'factor': capacity_factor, 'apply': apply} if transport == 'sized' else {}
  return DROPLESS[transport](x, plan, num_experts, ep, grouped_fn, **kw)


DROPLESS = {'all_to_all': dropless_all_to_all, 'sized': dropless_sized,
            'all_gather': dropless_all_gather,
            'ragged': dropless_ragged,
            'ragged_reference': functools.partial(
                dropless_ragged, ragged_all_to_all=ragged_all_to_all_reference)}
