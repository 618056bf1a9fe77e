"""Dispatch/combine backends (sparse_jax.dispatch): agreement, references, gradients.

'index' uses hand-written custom VJPs (gathers only), so its gradients are checked
against the 'einsum' reference (plain autodiff), against finite differences, and
against a loop-over-experts reference.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import sparse_jax as sj

R, DP = sj.routing, sj.dispatch
S, E, D = 12, 4, 8


def make(seed, s=S, e=E, d=D):
  r = np.random.default_rng(seed)
  f = lambda *sh: jnp.asarray(r.normal(size=sh).astype(np.float32))
  return f(s, d), f(e, d, d) / np.sqrt(d), f(s, e), f(s, d)   # x, w, logits, cotangent


def apply_experts(w):
  return lambda buf: jnp.einsum('ecd,edf->ecf', buf, w)


def run(backend, x, w, plan, c):
  """Routed output y [S, D] (or [G, S, D]) of one backend for a fixed plan."""
  e = w.shape[0]
  if backend == 'dropless':
    return DP.dropless(x, plan, e, lambda rows, gs: jax.lax.ragged_dot(rows, w, gs))
  table = DP.CAPACITY_BACKENDS[backend]
  buf, ctx = table.dispatch(x, plan, e, c)                            # [E, G*C, D]
  return table.combine(apply_experts(w)(buf), plan, ctx)


@pytest.mark.parametrize('backend', sorted(DP.CAPACITY_BACKENDS))
def test_grouped_dispatch_equals_each_group_alone(backend):
  """G groups in one call: slots [E, G*C, D] expert-major, and each group's output equals
  the group routed by itself."""
  g, c = 3, 4
  xs, w, logits, _ = make(21, s=g * S)
  x, logits = xs.reshape(g, S, D), logits.reshape(g, S, E)
  plan = jax.vmap(lambda l: R.route_top_k(l, 2, c))(logits)
  buf, _ = DP.CAPACITY_BACKENDS[backend].dispatch(x, plan, E, c)
  assert buf.shape == (E, g * c, D)
  y = run(backend, x, w, plan, c)
  for i in range(g):
    one = jax.tree.map(lambda a: a[i], plan)
    np.testing.assert_allclose(y[i], run(backend, x[i], w, one, c), rtol=1e-5, atol=1e-6)
    # Group i's slots of expert e sit at [e, i*C:(i+1)*C].
    np.testing.assert_array_equal(
        buf.reshape(E, g, c, D)[:, i], DP.CAPACITY_BACKENDS[backend].dispatch(x[i], one, E, c)[0])


def loop_reference(x, w, logits, k):
  """Independent numpy reference, unlimited capacity: sum_k weight * x_t @ w[e]."""
  x, w, logits = (np.asarray(a, np.float64) for a in (x, w, logits))
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  y = np.zeros_like(x)
  for t in range(x.shape[0]):
    top = np.argsort(-probs[t])[:k]
    wt = probs[t, top] / (probs[t, top].sum() if k >= 2 else 1.0)
    for e, a in zip(top, wt):
      y[t] += a * (x[t] @ w[e])
  return y


@pytest.mark.parametrize('k', [1, 2])
def test_backends_agree_without_drops_and_match_loop(k):
  x, w, logits, _ = make(k)
  c = S * k                           # every choice fits: nothing is dropped
  plan = R.route_top_k(logits, k, c)
  assert bool(plan.kept.all())
  want = loop_reference(x, w, logits, k)
  for backend in DP.BACKENDS:
    np.testing.assert_allclose(run(backend, x, w, plan, c), want, rtol=1e-4, atol=1e-5,
                               err_msg=backend)


@pytest.mark.parametrize('k', [1, 2])
def test_index_einsum_dropless_agree_with_drops(k):
  x, w, logits, _ = make(10 + k)
  c = R.capacity(S, E, k, 0.5)        # = ceil(0.5*k*12/4): forces drops
  plan = R.route_top_k(logits, k, c)
  assert not bool(plan.kept.all())
  y = {b: np.asarray(run(b, x, w, plan, c)) for b in DP.BACKENDS}
  np.testing.assert_allclose(y['index'], y['einsum'], rtol=1e-5, atol=1e-6)
  # dropless computes every row but uses the plan's weights (0 where dropped).
  np.testing.assert_allclose(y['dropless'], y['einsum'], rtol=1e-5, atol=1e-6)
  # A token whose every choice was dropped gets exactly zero output.
  all_dropped = ~np.asarray(plan.kept).any(-1)
  assert all_dropped.any()
  assert (y['index'][all_dropped] == 0).all()


def test_index_slots_layout():
  x, _, logits, _ = make(3)
  k, c = 2, 5
  plan = R.route_top_k(logits, k, c)
  buf, m = DP.index_dispatch(x, plan, E, c)
  buf, x = np.asarray(buf), np.asarray(x)
  p = {f: np.asarray(getattr(plan, f)) for f in plan._fields}
  filled = np.zeros((E, c), bool)
  for t in range(S):
    for j in range(k):
      if p['kept'][t, j]:
        e, sl = p['expert'][t, j], p['slot'][t, j]
        np.testing.assert_array_equal(buf[e, sl], x[t])   # token sits at its slot
        filled[e, sl] = True
  assert (buf[~filled] == 0).all()                       # empty slots are zero rows
  assert (~filled).any() and filled.any()
  np.testing.assert_array_equal(np.asarray(m.filled).reshape(E, c), filled)
  # einsum builds the same buffer.
  np.testing.assert_array_equal(np.asarray(DP.einsum_dispatch(jnp.asarray(x), plan, E, c)[0]),
                                buf)


def routed_loss(backend, k, c):
  """Scalar loss of (x, w, logits), differentiating through route_top_k's weights."""
  def loss(x, w, logits, ct):
    plan = R.route_top_k(logits, k, c)
    return jnp.sum(run(backend, x, w, plan, c) * ct)
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


@pytest.mark.parametrize('k,cf', [(1, 0.5), (2, 0.5), (2, 4.0)])
def test_index_gradients_match_einsum(k, cf):
  x, w, logits, ct = make(20 + k)
  c = R.capacity(S, E, k, cf)
  gi = routed_loss('index', k, c)(x, w, logits, ct)
  ge = routed_loss('einsum', k, c)(x, w, logits, ct)
  for name, a, b in zip(('dx', 'dw', 'dlogits'), gi, ge):
    assert float(jnp.abs(b).max()) > 0, name         # the check is not vacuous
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)


def test_index_gradients_finite_differences():
  # Fix the plan (selection and slots), make the combine weights an input, and check the
  # custom VJPs of gather-to-slots / gather-from-slots numerically, to second order.
  x, w, logits, _ = make(30)
  k, c = 2, 3                                             # small C: some drops
  plan = R.route_top_k(logits, k, c)
  assert not bool(plan.kept.all())

  def f(x, w, weight):
    return run('index', x, w, plan._replace(weight=weight), c)

  check_grads(f, (x, w, plan.weight), order=2, modes=['rev'], atol=2e-2, rtol=2e-2)


def test_dropped_choices_get_no_gradient():
  x, w, logits, ct = make(40)
  k, c = 1, 1
  plan = R.route_top_k(logits, k, c)
  dx, dw, dweight = jax.grad(
      lambda x, w, wt: jnp.sum(run('index', x, w, plan._replace(weight=wt), c) * ct),
      argnums=(0, 1, 2))(x, w, plan.weight)
  dropped = ~np.asarray(plan.kept[:, 0])
  assert dropped.any()
  assert (np.asarray(dx)[dropped] == 0).all()
  assert (np.asarray(dweight)[dropped] == 0).all()
  # Experts that received no token get no weight gradient.
  used = np.unique(np.asarray(plan.expert)[~dropped])
  unused = np.setdiff1d(np.arange(E), used)
  assert (np.asarray(dw)[unused] == 0).all()


def test_vmap_over_groups_index_matches_einsum():
  # Layers vmap the backends over groups G; the custom VJPs must batch correctly.
  g, k, c = 3, 2, 4
  r = np.random.default_rng(50)
  x = jnp.asarray(r.normal(size=(g, S, D)).astype(np.float32))
  logits = jnp.asarray(r.normal(size=(g, S, E)).astype(np.float32))
  ct = jnp.asarray(r.normal(size=(g, S, D)).astype(np.float32))
  w = make(51)[1]

  def loss(backend, x, w, logits):
    y = jax.vmap(lambda xg, lg: run(backend, xg, w, R.route_top_k(lg, k, c), c))(x, logits)
    return jnp.sum(y * ct)

  grad = lambda b: jax.jit(jax.grad(functools.partial(loss, b), argnums=(0, 1, 2)))
  gi, ge = grad('index')(x, w, logits), grad('einsum')(x, w, logits)
  for a, b in zip(gi, ge):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_expert_choice_plan_through_backends():
  # An expert-choice plan (K = E) is served by every backend; check index == einsum ==
  # a loop: each expert e applies to its top-C tokens, weighted by probs[t, e].
  x, w, logits, _ = make(60)
  c = 3
  plan = R.route_expert_choice(logits, c)
  probs = np.asarray(jax.nn.softmax(logits))
  kept = np.asarray(plan.kept)
  want = np.zeros((S, D))
  for e in range(E):
    for t in np.flatnonzero(kept[:, e]):
      want[t] += probs[t, e] * (np.asarray(x[t]) @ np.asarray(w[e]))
  for backend in ('index', 'einsum'):
    np.testing.assert_allclose(run(backend, x, w, plan, c), want, rtol=1e-4, atol=1e-5,
                               err_msg=backend)
