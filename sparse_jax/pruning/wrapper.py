"""The optax wrapper: prune inside the optimizer, on a schedule, with masks in its state.

    tx = wrap(optax.adamw(1e-3), sparsity=0.9, schedule='gmp', start_step=0,
              end_step=10_000, update_every=100)
    updates, state = tx.update(grads, state, params)     # params are required
    params = optax.apply_updates(params, updates)         # pruned entries are exactly 0

Per update call (`step` = number of earlier calls):
  1. at a mask-update step (see schedule.py) recompute the masks from the current params
     (and, for saliency, these grads); already-pruned entries score -inf, so a mask only
     ever loses entries and pruned weights never return;
  2. zero the pruned entries' grads and run the inner optimizer;
  3. own the final update: -param where pruned (params + update == 0 exactly), the inner
     update elsewhere, whatever the inner momentum says.
The recompute sits in lax.cond: other steps cost two elementwise selects per leaf.

schedule='dynamic' (dynamic sparse training: SET, RigL, SRigL) prunes to `sparsity` at
start_step as above, then at each later update step (< end_step) moves a decaying
fraction of every row's entries (dynamic.py). An entry grown by an update is left at
exactly 0 by it (it trains from the next step) and its inner-optimizer moments (every
params-shaped part of the inner state) are reset to 0. With fan_in='constant' and
min_salient > 0 an update may also ablate neurons and share their budget (dynamic.ablate).
"""
from __future__ import annotations

import dataclasses
import numbers
import warnings
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparse_jax.pruning import distribution as dist_lib
from sparse_jax.pruning import dynamic
from sparse_jax.pruning import masking as mask_lib
from sparse_jax.pruning import schedule as schedule_lib
from sparse_jax.pruning import scores as score_lib
from sparse_jax.pruning import structured, units as unit_lib
from sparse_jax.pruning.paths import default_prunable, flatten, is_variable, path_str, unwrap

SCOPES = ('layer', 'global')
STRUCTURES = (None,) + structured.KINDS
# Up to this many mask-update steps, per-unit prune counts are tabulated on the host in
# float64 (exactly round(s * size)); beyond it they are computed on device in float32.
MAX_TABLE_STEPS = 4096


class PruneState(NamedTuple):
  """Optimizer state of `wrap` (a pytree of arrays: orbax and shardings follow params).

  step:  i32[], the number of update calls so far.
  masks: shaped like params; bool[leaf shape] (True = kept) for pruned leaves, None
         for the others.
  inner: the wrapped optimizer's state.
  """
  step: jax.Array
  masks: Any
  inner: Any


@dataclasses.dataclass(frozen=True)
class _Config:
  sparsity: float
  method: str
  schedule: str
  start_step: int
  end_step: int | None
  update_every: int
  distribution: str
  scope: str
  n_m: tuple[int, int] | None
  prunable: Callable
  seed: int
  structure: str | None
  num_heads: int | None
  regrow: str = 'gradient'
  fan_in: str = 'any'
  drop_fraction: float = 0.3
  min_salient: float = 0.0
  stacked: Callable | None = None


@dataclasses.dataclass(frozen=True)
class _Plan:
  units: tuple[unit_lib.Unit, ...]
  pruned: tuple[int, ...]            # leaf indices that carry a mask, ascending
  shapes: tuple[tuple[int, ...], ...]
  steps: tuple[int, ...]             # mask-update steps
  table: np.ndarray | None           # i32[steps, units] (global scope: [steps, 1])


def _is_int(x) -> bool:
  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _choice(name, value, allowed):
  if value not in allowed:
    raise ValueError(f'{name}={value!r} is unknown; use one of {allowed}.')


def _validate(c: _Config):
  if not (isinstance(c.sparsity, (int, float)) and 0 <= c.sparsity < 1):
    raise ValueError(f'sparsity={c.sparsity!r} must be a number in [0, 1).')
  _choice('method', c.method, score_lib.METHODS)
  _choice('schedule', c.schedule, schedule_lib.SCHEDULES)
  _choice('distribution', c.distribution, dist_lib.DISTRIBUTIONS)
  _choice('scope', c.scope, SCOPES)
  _choice('structure', c.structure, STRUCTURES)
  if not _is_int(c.start_step) or c.start_step < 0:
    raise ValueError(f'start_step={c.start_step!r} must be an int >= 0.')
  if not _is_int(c.update_every) or c.update_every < 1:
    raise ValueError(f'update_every={c.update_every!r} must be an int >= 1.')
  # N:M is one-shot under any schedule, so the default 'gmp' needs no end_step then.
  if c.schedule == 'gmp' and c.n_m is None and not (_is_int(c.end_step)
                                                   and c.end_step > c.start_step):
    raise ValueError(f"schedule='gmp' needs an int end_step > start_step={c.start_step}; "
                     f'got end_step={c.end_step!r}.')
  if c.n_m is not None:
    ok = (isinstance(c.n_m, (tuple, list)) and len(c.n_m) == 2
          and all(_is_int(v) for v in c.n_m) and 0 < c.n_m[0] < c.n_m[1])
    if not ok:
      raise ValueError(f'n_m={c.n_m!r} must be a pair (N, M) of ints with 0 < N < M, '
                       'e.g. (2, 4).')
    if c.structure is not None:
      raise ValueError(f'n_m={tuple(c.n_m)} and structure={c.structure!r} are two different '
                       'patterns; pass one of them.')
  if c.structure is not None:
    if c.scope != 'layer' or c.distribution != 'uniform':
      raise ValueError(f'structure={c.structure!r} prunes every layer to the same sparsity: '
                       "it needs scope='layer' and distribution='uniform' (got "
                       f'scope={c.scope!r}, distribution={c.distribution!r}).')
    if c.structure == 'heads' and not (_is_int(c.num_heads) and c.num_heads >= 1):
      raise ValueError(f"structure='heads' needs num_heads >= 1; got {c.num_heads!r}.")
  if c.schedule == 'dynamic':
    _choice('regrow', c.regrow, dynamic.REGROW)
    _choice('fan_in', c.fan_in, dynamic.FAN_IN)
    if not (_is_int(c.end_step) and c.end_step > c.start_step):
      raise ValueError(f"schedule='dynamic' needs an int end_step > start_step="
                       f'{c.start_step} (topology updates stop there); got {c.end_step!r}.')
    if not (isinstance(c.drop_fraction, (int, float)) and 0 <= c.drop_fraction <= 1):
      raise ValueError(f'drop_fraction={c.drop_fraction!r} must be in [0, 1] (0 = static '
                       'sparse training).')
    if not (isinstance(c.min_salient, (int, float)) and 0 <= c.min_salient <= 1):
      raise ValueError(f'min_salient={c.min_salient!r} must be in [0, 1] (0 = no neuron '
                       'ablation).')
    if c.min_salient and (c.fan_in, c.regrow) != ('constant', 'gradient'):
      raise ValueError(f'min_salient={c.min_salient} ablates neurons by gradient saliency '
                       "(SRigL): it needs fan_in='constant' and regrow='gradient' (got "
                       f'fan_in={c.fan_in!r}, regrow={c.regrow!r}).')
    if c.n_m is not None or c.structure is not None or c.scope != 'layer':
      raise ValueError("schedule='dynamic' moves single weights within each layer: it needs "
                       f"scope='layer' and no n_m or structure (got scope={c.scope!r}, "
                       f'n_m={c.n_m!r}, structure={c.structure!r}).')
  if c.schedule == 'gmp' and c.n_m is None and (c.end_step - c.start_step) % c.update_every:
    last = c.end_step - (c.end_step - c.start_step) % c.update_every
    warnings.warn(f'end_step - start_step = {c.end_step - c.start_step} is not a multiple of '
                  f'update_every={c.update_every}: the last mask update is at step {last}, '
                  f'short of sparsity={c.sparsity}.', stacklevel=3)
  if not callable(c.prunable):
    raise ValueError(f'prunable={c.prunable!r} must be callable(path, leaf) -> bool, or None.')


def _counts(c: _Config, units, shapes, s, xp):
  """Entries (groups) to prune per row of each unit at overall sparsity s."""
  if c.n_m is not None:
    return xp.full((len(units),), c.n_m[1] - c.n_m[0], dtype=xp.int32)
  if c.schedule == 'dynamic':             # per row: each expert, or each output neuron
    shapes = [shapes[u.leaves[0]] for u in units]
    frac = 1 - dist_lib.erk_densities(shapes, s, xp) if c.distribution == 'erk' else s
    return xp.round(frac * xp.asarray([u.groups for u in units])).astype(xp.int32)
  if c.structure is not None:
    return xp.round(s * xp.asarray([u.groups for u in units])).astype(xp.int32)
  if c.scope == 'global':
    total = sum(u.groups for u in units)
    return xp.round(xp.asarray([s * total])).astype(xp.int32)
  # A stacked leaf's rows are layers of one shape: each is a layer of the distribution.
  layers = [[shapes[u.leaves[0]][1:] if u.rows > 1 else shapes[u.leaves[0]]] * u.rows
            for u in units]
  counts = dist_lib.zeros_per_layer(s, [x for rows in layers for x in rows],
                                    c.distribution, xp)
  return counts[np.cumsum([0] + [u.rows for u in units[:-1]])]


def _plan(c: _Config, paths, vals) -> _Plan:
  shapes = tuple(tuple(v.shape) for v in vals)
  idx = [i for i, (p, v) in enumerate(zip(paths, vals)) if c.prunable(p, v)]
  if c.structure is not None:
    units = unit_lib.structured_units(idx, paths, shapes, c.structure, c.num_heads)
  elif c.n_m is not None:
    units = unit_lib.n_m_units(idx, paths, shapes, *c.n_m)
  elif c.schedule == 'dynamic':
    units = unit_lib.row_units(idx, paths, shapes, c.fan_in)
  else:
    layers = [c.scope == 'layer' and c.stacked is not None and c.stacked(paths[i], vals[i])
              for i in idx]
    units = unit_lib.element_units(idx, shapes, layers)
  pruned = tuple(sorted(i for u in units for i in u.leaves))
  sched = 'one_shot' if c.n_m is not None else c.schedule
  steps = tuple(schedule_lib.update_steps(sched, c.start_step, c.end_step, c.update_every))
  table = None
  if c.schedule == 'dynamic':             # one budget, at start_step and ever after
    table = _counts(c, units, shapes, c.sparsity, np)[None]
    for u, zeros in zip(units, table[0]):
      if zeros >= u.groups:
        raise ValueError(
            f'dynamic sparsity {c.sparsity} leaves leaf {path_str(paths[u.leaves[0]])} '
            f'{tuple(shapes[u.leaves[0]])} no weight in a row of {u.groups} '
            f"(fan_in={c.fan_in!r}); lower sparsity or exclude the leaf with prunable=.")
  elif units and len(steps) <= MAX_TABLE_STEPS:
    table = np.stack([_counts(c, units, shapes, _host_sparsity(c, t), np)
                      for t in steps])
  return _Plan(tuple(units), pruned, shapes, steps, table)


def _host_sparsity(c: _Config, step: int) -> float:
  sched = 'one_shot' if c.n_m is not None else c.schedule
  return schedule_lib.target_sparsity(step, sparsity=c.sparsity, schedule=sched,
                                      start_step=c.start_step, end_step=c.end_step)


def _device_sparsity(c: _Config, k):
  """The target of mask-update number k (f32) when there is no host table."""
  if c.schedule == 'one_shot':
    return jnp.float32(c.sparsity)
  t = (k * c.update_every).astype(jnp.float32) / (c.end_step - c.start_step)
  return c.sparsity * (1 - (1 - t) ** 3)


def _recompute(c: _Config, plan: _Plan, vals, grads, old, step):
  """New masks of the pruned leaves (same order as plan.pruned)."""
  pos = {i: k for k, i in enumerate(plan.pruned)}
  elem = score_lib.element_scores(c.method, vals, grads, plan.pruned, c.seed)
  k = jnp.clip((step - c.start_step) // c.update_every, 0, len(plan.steps) - 1)
  if plan.table is not None:
    k = jnp.minimum(k, plan.table.shape[0] - 1)
    counts = jnp.asarray(plan.table)[k]
  else:
    counts = _counts(c, plan.units, plan.shapes, _device_sparsity(c, k), jnp)
  scores = []
  for u in plan.units:
    sc = u.scores([elem[pos[i]] for i in u.leaves])
    alive = u.scores([old[pos[i]].astype(jnp.float32) for i in u.leaves]) > 0
    scores.append(jnp.where(alive, sc, -jnp.inf))
  if c.scope == 'global' and c.n_m is None:
    keep_all = mask_lib.prune_lowest(jnp.concatenate(scores, axis=-1), counts[0])
    keeps = jnp.split(keep_all, np.cumsum([s.shape[-1] for s in scores])[:-1], axis=-1)
  else:
    keeps = [mask_lib.prune_lowest(sc, counts[j]) for j, sc in enumerate(scores)]
  new = list(old)
  for u, keep in zip(plan.units, keeps):
    for i, mask in zip(u.leaves, u.masks(keep, plan.shapes)):
      new[pos[i]] = mask
  return new


def _drop_and_grow(c: _Config, plan: _Plan, vals, grads, old, step):
  """(new masks, grown masks) of the pruned leaves after one topology update."""
  frac = dynamic.drop_fraction(step, alpha=c.drop_fraction, start_step=c.start_step,
                               end_step=c.end_step)
  key = jax.random.fold_in(jax.random.key(c.seed), step)
  pos = {i: k for k, i in enumerate(plan.pruned)}
  new, grown = list(old), list(old)
  for u, zeros in zip(plan.units, plan.table[0]):
    (i,) = u.leaves
    score = dynamic.grow_scores(c.regrow, grads[pos[i]], jax.random.fold_in(key, i))
    rows = [u.scores([x]) for x in (old[pos[i]], jnp.abs(vals[pos[i]]), score)]
    num_swap = jnp.round(frac * rows[0].sum(-1)).astype(jnp.int32)
    zeros = int(zeros)
    if c.min_salient:                      # rows [E * out, in] -> layers [E, out, in]
      layers = [r.reshape(-1, plan.shapes[i][-1], u.groups) for r in rows]
      zeros = dynamic.ablate(*layers, zeros, frac, c.min_salient).reshape(-1)
    active, born = dynamic.drop_and_grow(*rows, zeros, num_swap)
    (new[pos[i]],), (grown[pos[i]],) = u.masks(active, plan.shapes), u.masks(born, plan.shapes)
  return new, grown


def _zero_where(tree, params_def, grown):
  """Zero the `grown` entries of every params-shaped subtree of `tree` (an optimizer
  state's moments); grown lists a bool array or None per params leaf."""
  def like_params(x):
    return jax.tree.structure(x, is_leaf=is_variable) == params_def

  def reset(x):
    if not like_params(x):
      return x
    leaves, treedef = jax.tree.flatten(x, is_leaf=is_variable)
    return _rewrap(treedef, x, [unwrap(v) if g is None else
                                jnp.where(g, jnp.zeros((), unwrap(v).dtype), unwrap(v))
                                for v, g in zip(leaves, grown)])
  return jax.tree.map(reset, tree, is_leaf=like_params)


def _is_update_step(c: _Config, plan: _Plan, step):
  if len(plan.steps) == 1:
    return step == plan.steps[0]
  return ((step >= c.start_step) & (step <= c.end_step)
          & ((step - c.start_step) % c.update_every == 0))


def wrap(inner: optax.GradientTransformation, sparsity: float = 0.0,
         method: str = 'magnitude', schedule: str = 'gmp', start_step: int = 0,
         end_step: int | None = None, update_every: int = 100,
         distribution: str = 'uniform', scope: str = 'layer',
         n_m: tuple[int, int] | None = None, prunable: Callable | None = None, *,
         seed: int = 0, structure: str | None = None, num_heads: int | None = None,
         regrow: str = 'gradient', fan_in: str = 'any', drop_fraction: float = 0.3,
         min_salient: float = 0.0,
         stacked: Callable | None = None) -> optax.GradientTransformationExtraArgs:
  """Prune the params `inner` optimizes; see the module docstring and docs/pruning.md.

  Args:
    inner: the optimizer (wrap the whole chain; nothing after this may change updates).
    sparsity: overall target in [0, 1). A unit pruned to s has round(s * size) zeros.
    method: 'magnitude' |w|, 'random' (from `seed`), 'saliency' |w * grad|.
    schedule: 'gmp' (cubic, masks recomputed every `update_every` steps from start_step
      to end_step, fixed after), 'one_shot' (once, at start_step) or 'dynamic' (at
      `sparsity` from start_step on, topology updates every `update_every` steps
      until end_step; see regrow, fan_in, drop_fraction).
    distribution: 'uniform' (each unit at s) or 'erk' (distribution.py; stacked experts
      use the per-expert kernel shape). Ignored with scope='global'.
    scope: 'layer' (each leaf to its own target) or 'global' (one threshold over all
      pruned leaves, round(s * total) zeros).
    n_m: (N, M): keep the N largest of every M consecutive entries along the input axis
      (axis 0 of [in, out], -2 of [E, in, out]). N:M masks are one-shot: they appear at
      start_step and stay fixed; sparsity, distribution and scope are ignored and any
      schedule acts as 'one_shot'. A prunable leaf whose input axis M does not divide is
      a ValueError at init.
    prunable: (path, leaf) -> bool, path the plain keys from the root; default
      paths.default_prunable (FFN / expert / attention kernels only).
    seed: for method='random'.
    structure: None, or prune whole groups of the TransformerLM (structured.py):
      'ffn_neurons' (per expert for stacked experts), 'heads' (needs num_heads) or
      'experts'; each layer loses round(s * groups) groups on the same schedule.
    regrow: schedule='dynamic' grows where |grad| is largest ('gradient', RigL) or at
      random ('random', SET).
    fan_in: 'any' (each kernel, each expert of a stack, keeps round((1-s_l)*size) weights)
      or 'constant' (each output neuron keeps round((1-s_l)*in) inputs, SRigL).
    drop_fraction: alpha; an update moves round(alpha/2*(1+cos(pi*t/T))*K) of the K
      weights of every row, t = step - start_step, T = end_step - start_step.
    min_salient: with fan_in='constant' and regrow='gradient', SRigL's neuron ablation:
      a neuron with fewer than max(1, floor(min_salient * K)) salient weights is pruned
      whole and its layer's other neurons share its budget (dynamic.py); 0 = never.
    stacked: (path, leaf) -> bool for leaves whose leading axis holds the layers of a
      scanned stack [G, ...] (sparse_jax.roles.stacked): with scope='layer' each layer
      gets its own budget, as if unrolled. N:M and dynamic rows are per layer already;
      structure= does not take stacked leaves.
  Returns a GradientTransformation whose state is a PruneState; update needs params.
  """
  c = _Config(sparsity, method, schedule, start_step, end_step, update_every,
              distribution, scope, tuple(n_m) if isinstance(n_m, list) else n_m,
              prunable or default_prunable, seed, structure, num_heads, regrow, fan_in,
              drop_fraction, min_salient, stacked)
  _validate(c)
  inner = optax.with_extra_args_support(inner)
  cache: dict = {}

  def plan_for(paths, vals):
    key = (tuple(paths), tuple((tuple(v.shape), str(v.dtype)) for v in vals))
    if key not in cache:
      cache[key] = _plan(c, paths, vals)
    return cache[key]

  def init_fn(params):
    paths, vals, treedef = flatten(params)
    plan = plan_for(paths, vals)
    # A mask keeps its parameter's Variable metadata (partition names), so an
    # nnx.Optimizer shards it like the parameter.
    like = jax.tree.leaves(params, is_leaf=is_variable)
    masks = [None] * len(vals)
    for i in plan.pruned:
      ones = jnp.ones_like(vals[i], dtype=bool)
      masks[i] = like[i].replace(ones) if is_variable(like[i]) else ones
    return PruneState(jnp.zeros((), jnp.int32), treedef.unflatten(masks), inner.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError('sparse_jax.pruning.wrap: update(grads, state, params) needs params '
                       '(pruning scores and the final update -param come from them).')
    paths, vals, _ = flatten(params)
    plan = plan_for(paths, vals)
    grads, g_def = jax.tree.flatten(updates, is_leaf=is_variable)
    old, m_def = jax.tree.flatten(state.masks, is_leaf=lambda x: x is None or is_variable(x))
    if not len(grads) == len(old) == len(vals):
      raise ValueError(f'params ({len(vals)} leaves), grads ({len(grads)}) and the pruning '
                       f'state ({len(old)} masks) do not have the same structure.')
    grads, old = [unwrap(g) for g in grads], [unwrap(m) for m in old]
    for i in plan.pruned:          # eager calls only: under jit the loss guard sees a NaN
      mask_lib.check_finite(path_str(paths[i]), weights=vals[i],
                            gradients=grads[i] if c.method == 'saliency' else None)
    masks, grown = list(old), [None] * len(old)
    if plan.pruned:
      sel = lambda xs: [xs[i] for i in plan.pruned]
      args = sel(vals), sel(grads), sel(old), state.step
      if c.schedule == 'dynamic':
        none = lambda v, g, m, t: (m, [jnp.zeros_like(x) for x in m])
        first = lambda v, g, m, t: (_recompute(c, plan, v, g, m, t), none(v, g, m, t)[1])
        move = lambda v, g, m, t: _drop_and_grow(c, plan, v, g, m, t)
        branch = jnp.where(state.step == c.start_step, 1,
                           jnp.where(_is_update_step(c, plan, state.step), 2, 0))
        new, born = jax.lax.switch(branch, [none, first, move], *args)
        for i, b in zip(plan.pruned, born):
          grown[i] = b
      else:
        new = jax.lax.cond(_is_update_step(c, plan, state.step),
                           lambda v, g, m, t: _recompute(c, plan, v, g, m, t),
                           lambda v, g, m, t: m, *args)
      for i, m in zip(plan.pruned, new):
        masks[i] = m
    masked = [g if m is None else jnp.where(m, g, jnp.zeros((), g.dtype))
              for g, m in zip(grads, masks)]
    inner_updates, inner_state = inner.update(
        _rewrap(g_def, updates, masked), state.inner, params, **extra_args)
    u_leaves, u_def = jax.tree.flatten(inner_updates, is_leaf=is_variable)
    # Pruned and just-grown entries end at exactly 0.
    final = [unwrap(u) if m is None else
             jnp.where(m if b is None else m & ~b, unwrap(u), -p.astype(unwrap(u).dtype))
             for u, m, b, p in zip(u_leaves, masks, grown, vals)]
    if c.schedule == 'dynamic':
      inner_state = _zero_where(inner_state, jax.tree.structure(params, is_leaf=is_variable),
                                grown)
    return (_rewrap(u_def, inner_updates, final),
            PruneState(state.step + 1, m_def.unflatten(masks), inner_state))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _rewrap(treedef, like, arrays):
  """Put arrays back into the tree `like`, keeping nnx Variable wrappers if it has any."""
  old = jax.tree.flatten(like, is_leaf=is_variable)[0]
  return treedef.unflatten([o.replace(a) if is_variable(o) else a
                            for o, a in zip(old, arrays)])


def masks(opt_state):
  """The masks of the PruneState inside opt_state (also an nnx.Optimizer's opt_state).

  Returns a pytree shaped like params: bool arrays (True = kept) for pruned leaves,
  None for the others.
  """
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, PruneState))
           if isinstance(s, PruneState)]
  if len(found) != 1:
    raise ValueError(f'expected one sparse_jax.pruning state in opt_state, found {len(found)}.')
  return jax.tree.map(unwrap, found[0].masks, is_leaf=is_variable)
