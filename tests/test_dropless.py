"""Dropless MoE: the grouped matmul, the sort, zero-probability choices, and expert
parallelism over every transport against the single-device layer (outputs and gradients)."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import sparse_jax as sj
from sparse_jax import dispatch as DP
from sparse_jax import expert_parallel as EP
from sparse_jax import routing as R
from sparse_jax.grouped_matmul import GROUPED_MATMULS, grouped_ffn, grouped_matmul

B, L, D, F, E = 8, 8, 16, 32, 8
MESHES = [(1, 8), (2, 4), (4, 2), (8, 1)]
CPU = jax.default_backend() == 'cpu'


def _mesh(shape):
  return jax.make_mesh(shape, ('data', 'expert'), axis_types=(AxisType.Auto,) * 2)


# ------------------------------------------------------------------- grouped matmul

def _reference_gmm(x, w, sizes):
  """numpy: row i of group g is x[i] @ w[g]; rows past the groups are 0."""
  x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
  out, row = np.zeros((x.shape[0], w.shape[2])), 0
  for g, n in enumerate(sizes):
    out[row:row + n] = x[row:row + n] @ w[g]
    row += n
  return out


# Empty groups, a group smaller than a window, rows past the groups, N < block.
SIZES = [(5, 0, 17, 3), (0, 0, 25, 0), (1, 2, 3, 4), (9, 0, 0, 1)]


@pytest.mark.parametrize('impl', GROUPED_MATMULS)
@pytest.mark.parametrize('sizes', SIZES)
@pytest.mark.parametrize('block', [pytest.param(1, marks=pytest.mark.slow), 4,
                                   pytest.param(64, marks=pytest.mark.slow)])
def test_grouped_matmul_matches_numpy_with_gradients(impl, sizes, block):
  """Both implementations on CPU (the accelerator one too, so its choice is tested here):
  outputs, and gradients of x and w equal the per-row numpy reference."""
  n, d, f = 25, 6, 5
  r = np.random.default_rng(sum(sizes) + block)
  x, w = r.normal(size=(n, d)).astype(np.float32), r.normal(size=(4, d, f)).astype(np.float32)
  ct = r.normal(size=(n, f)).astype(np.float32)
  gs = jnp.asarray(sizes, jnp.int32)
  run = jax.jit(lambda x, w: grouped_matmul(x, w, gs, impl=impl, block_size=block))
  np.testing.assert_allclose(run(x, w), _reference_gmm(x, w, sizes), rtol=1e-5, atol=1e-5)
  gx, gw = jax.grad(lambda x, w: jnp.sum(run(x, w) * ct), argnums=(0, 1))(x, w)
  used = sum(sizes)
  # d/dx of row i = ct[i] @ w[g]^T; d/dw[g] = x[rows of g]^T ct[rows of g].
  want_gx = _reference_gmm(ct, np.swapaxes(w, 1, 2), sizes)
  want_gw = np.zeros_like(w, np.float64)
  row = 0
  for g, m in enumerate(sizes):
    want_gw[g] = x[row:row + m].T.astype(np.float64) @ ct[row:row + m]
    row += m
  np.testing.assert_allclose(gx, want_gx, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gw, want_gw, rtol=1e-5, atol=1e-5)
  assert (np.asarray(gx)[used:] == 0).all()


# The default tier: 'blocked' with each activation on the mostly-empty buffer, keeping
# or recomputing the pre-activations; the rest slow ('ragged_dot' keeps them anyway).
FFN_CASES = [pytest.param(impl, act, sizes, keep,
                          marks=() if (impl, sizes) == ('blocked', (0, 3, 0, 2))
                          else pytest.mark.slow)
             for impl in GROUPED_MATMULS for act in sj.layers.ACTIVATIONS
             for sizes in [SIZES[0], SIZES[2], (0, 3, 0, 2)]
             for keep in ((False, True) if impl == 'blocked' else (False,))]


@pytest.mark.parametrize('impl, activation, sizes, keep_hidden', FFN_CASES)
def test_grouped_ffn_is_the_ffn_rule_per_group_with_gradients(impl, activation, sizes,
                                                              keep_hidden):
  """grouped_ffn equals layers.ffn run on each group's rows with that expert's weights
  (rows past the groups: 0), outputs and the gradients of x and every weight ('blocked'
  recomputes the pre-activations in its backward, or reads them saved: keep_hidden).
  Rows past the groups, most of a transport's receive buffer (the last case: 20 of 25),
  get no gradient."""
  n, d, f, block = 25, 6, 5, 4
  r = np.random.default_rng(sum(sizes))
  names = sj.layers.ffn_weight_names(activation)
  w = {m: jnp.asarray(r.normal(size=(4, f, d) if m == 'wo' else (4, d, f)), jnp.float32)
       for m in names}
  x = jnp.asarray(r.normal(size=(n, d)), jnp.float32)
  ct = jnp.asarray(r.normal(size=(n, d)), jnp.float32)
  gs = jnp.asarray(sizes, jnp.int32)

  def reference(w, x):
    out, row = [], 0
    for g, m in enumerate(sizes):
      out.append(sj.layers.ffn({k: v[g] for k, v in w.items()}, x[row:row + m], activation))
      row += m
    return jnp.concatenate(out + [jnp.zeros((n - row, d))])

  run = lambda w, x: grouped_ffn(w, x, gs, activation=activation, impl=impl,
                                 block_size=block, keep_hidden=keep_hidden)
  loss = lambda fn: jax.jit(jax.value_and_grad(lambda w, x: jnp.sum(fn(w, x) * ct),
                                               argnums=(0, 1)))
  np.testing.assert_allclose(jax.jit(run)(w, x), reference(w, x), rtol=1e-5, atol=1e-5)
  (_, (got_w, got_x)), (_, (want_w, want_x)) = loss(run)(w, x), loss(reference)(w, x)
  np.testing.assert_allclose(got_x, want_x, rtol=1e-5, atol=1e-5)
  for m in names:
    np.testing.assert_allclose(got_w[m], want_w[m], rtol=1e-5, atol=1e-5, err_msg=m)
  assert (np.asarray(got_x)[sum(sizes):] == 0).all()


def _matmuls_outside_loops(hlo: str) -> list[str]:
  """The instructions of a compiled module's entry computation that are matmuls or
  fusions holding one (XLA:CPU fuses dots into fusions of their own)."""
  bodies = dict(re.findall(r'^(?:ENTRY )?%?([\w.\-]+) .*?\{\n(.*?)^\}', hlo, re.M | re.S))
  entry = re.search(r'^ENTRY .*?\{\n(.*?)^\}', hlo, re.M | re.S).group(1)
  has_dot = lambda line: ' dot(' in line or any(
      ' dot(' in bodies.get(c, '') for c in re.findall(r'calls=%?([\w.\-]+)', line))
  return [line.strip()[:120] for line in entry.splitlines() if has_dot(line)]


@pytest.mark.parametrize('keep_hidden', [False, True])
@pytest.mark.parametrize('n', [3, 4, 20, 32, 100])
def test_blocked_ffn_keeps_every_matmul_inside_its_loops(n, keep_hidden):
  """Rows past the groups cost no FFN work: every matmul of the blocked FFN, forward
  and backward, runs inside the loops over the groups' windows. A window as large as
  the buffer, or one that does not move with its loop index, is loop-invariant, and
  XLA hoists it out and computes it whether or not any group has a row (a 320-row
  spill buffer with 8 rows took the time of 320). One expert, as on a device of the
  benchmark's expert axis: XLA removes the loop over one group, so a hoisted matmul
  lands in the entry computation. Block 4: n covers a buffer smaller than a block, one
  block, and up to, at and past the largest window (8 blocks)."""
  d, f = 6, 5
  w = {'wi': jnp.ones((1, d, f)), 'wo': jnp.ones((1, f, d))}
  loss = lambda w, x, gs: jnp.sum(grouped_ffn(w, x, gs, activation='gelu', block_size=4,
                                              keep_hidden=keep_hidden))
  grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
  hlo = grad.lower(w, jnp.ones((n, d)), jnp.asarray([1], jnp.int32)).compile().as_text()
  assert _matmuls_outside_loops(hlo) == []


def test_grouped_matmul_errors_name_the_value():
  with pytest.raises(ValueError, match=r"block_size=0 must be a positive integer"):
    sj.moe.MoE(D, F, E, dispatch='dropless', block_size=0)
  with pytest.raises(ValueError, match=r"grouped_matmul='megablocks'.*'blocked'"):
    sj.moe.MoE(D, F, E, dispatch='dropless', grouped_matmul='megablocks')


# --------------------------------------------------------------------- sort and plan

def test_sort_map_hand_case():
  """Keys outside [0, G) are not computed and sort last; groups are contiguous in
  (group, token, k) order; group sizes count the valid keys."""
  key = jnp.asarray([[2, 0], [0, 3], [1, 2]], jnp.int32)   # G=3: key 3 is not computed
  m, sizes = DP.sort_map(key, 3)
  np.testing.assert_array_equal(sizes, [2, 1, 2])
  # Flat choices t*K + k: group 0 = {1, 2}, group 1 = {4}, group 2 = {0, 5}, then 3.
  np.testing.assert_array_equal(m.choice, [1, 2, 4, 0, 5, 3])
  np.testing.assert_array_equal(m.src, [0, 1, 2, 0, 2, 1])
  np.testing.assert_array_equal(m.filled, [1, 1, 1, 1, 1, 0])
  np.testing.assert_array_equal(m.kept, [[1, 1], [1, 0], [1, 1]])
  np.testing.assert_array_equal(np.asarray(m.dest)[np.asarray(m.kept)], [3, 0, 1, 2, 4])


def test_zero_probability_choices_are_no_requests():
  """Token 0's second choice has probability exactly 0 (logit gap 1e4). It takes no
  slot, so token 1's real second choice for the same expert gets slot 0 and is kept at
  capacity 1; it is neither demand nor dropped; every backend gives it weight 0."""
  logits = jnp.asarray([[0.0, -1e4, -1e4], [0.5, 0.0, -1e4]], jnp.float32)
  plan = R.route_top_k(logits, 2, capacity=1)
  np.testing.assert_array_equal(plan.expert, [[0, 1], [0, 1]])
  assert int(plan.slot[0, 1]) == -1 and not bool(plan.kept[0, 1])
  assert float(plan.weight[0, 1]) == 0.0
  assert int(plan.slot[1, 1]) == 0 and bool(plan.kept[1, 1])
  stats = R.routing_stats(logits, plan)
  np.testing.assert_array_equal(stats['demand'], [2, 1, 0])      # 3 requests, not 4
  np.testing.assert_array_equal(stats['kept'], [1, 1, 0])        # token 1's e0 dropped
  r = np.random.default_rng(0)
  x = jnp.asarray(r.normal(size=(2, 4)), jnp.float32)
  w = jnp.asarray(r.normal(size=(3, 4, 4)), jnp.float32)
  p = np.exp(np.asarray(logits[1]) - np.asarray(logits[1]).max())
  p /= p.sum()
  want_capacity = np.stack([np.asarray(x[0] @ w[0]),
                            p[1] / (p[0] + p[1]) * np.asarray(x[1] @ w[1])])
  for backend, table in DP.CAPACITY_BACKENDS.items():
    buf, ctx = table.dispatch(x, plan, 3, 1)
    y = table.combine(jnp.einsum('ecd,edf->ecf', buf, w), plan, ctx)
    np.testing.assert_allclose(y, want_capacity, rtol=1e-5, atol=1e-6, err_msg=backend)
  dropless_plan = R.route_top_k(logits, 2, capacity=2)
  assert R.routing_metrics(R.routing_stats(logits, dropless_plan))['dropped_fraction'] == 0
  y = DP.dropless(x, dropless_plan, 3, lambda rows, gs: grouped_matmul(rows, w, gs))
  want = want_capacity.copy()
  want[1] += p[0] / (p[0] + p[1]) * np.asarray(x[1] @ w[0])
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)


def test_expert_choice_never_keeps_a_zero_probability_token():
  logits = jnp.asarray([[0.0, -1e4], [0.0, 1.0], [0.0, 2.0]], jnp.float32)
  plan = R.route_expert_choice(logits, capacity=3)
  assert not bool(plan.kept[0, 1]) and int(plan.slot[0, 1]) == -1
  assert bool(plan.kept[1:, 1].all())


# ------------------------------------------------------------- the layer, one device

def _inputs(seed=0):
  kx, kc = jax.random.split(jax.random.key(seed))
  return jax.random.normal(kx, (B, L, D)), jax.random.normal(kc, (B, L, D))


def _run(layer, x, ct):
  graphdef, state = nnx.split(layer)

  def loss(state, x):
    y, aux = nnx.merge(graphdef, state)(x, train=True)
    return (jnp.sum(y * ct) + 0.5 * aux['load_balance_loss']
            + 0.1 * aux['router_z_loss']), (y, aux)

  (_, (y, aux)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
      state, x)
  return jax.device_get((y, aux, grads))


def _assert_same(got, want, rtol=1e-5, atol=1e-5):
  (y1, aux1, g1), (y0, aux0, g0) = got, want
  np.testing.assert_allclose(y1, y0, rtol=rtol, atol=atol)
  np.testing.assert_allclose(aux1['load_balance_loss'], aux0['load_balance_loss'], rtol=1e-5)
  leaves0, leaves1 = jax.tree.leaves(g0), jax.tree.leaves(g1)
  assert len(leaves0) == len(leaves1) >= 4
  for a, b in zip(leaves1, leaves0):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize('k', [pytest.param(1, marks=pytest.mark.slow), 2])
def test_dropless_equals_capacity_layer_that_drops_nothing(k):
  """The dropless layer equals the index layer with capacity S (cf = E/k): outputs and
  gradients; both report 0 dropped."""
  x, ct = _inputs(1)
  kw = dict(k=k, activation='swiglu', shared_d_ff=8)
  dropless = _run(sj.moe.MoE(D, F, E, dispatch='dropless', rngs=nnx.Rngs(2), **kw), x, ct)
  capacity = _run(sj.moe.MoE(D, F, E, dispatch='index', capacity_factor=E / k,
                             rngs=nnx.Rngs(2), **kw), x, ct)
  _assert_same(dropless, capacity)
  assert float(dropless[1]['dropped_fraction']) == 0.0
  assert float(capacity[1]['dropped_fraction']) == 0.0


def test_grouped_matmul_choices_are_one_layer():
  """'blocked' (XLA:CPU's default) and 'ragged_dot' (accelerators') give the same layer."""
  x, ct = _inputs(2)
  runs = [_run(sj.moe.MoE(D, F, E, k=2, dispatch='dropless', grouped_matmul=g,
                          block_size=4, rngs=nnx.Rngs(0)), x, ct) for g in GROUPED_MATMULS]
  _assert_same(runs[0], runs[1])
  assert sj.moe.MoE(D, F, E).experts.grouped_matmul == 'blocked'


# ------------------------------------------------------- expert parallelism (dropless)

def _sharded_vs_single(shape, transport, k, variant, capacity_factor=1.25):
  kw = dict(k=k, dispatch='dropless', rngs=nnx.Rngs(3), ep_transport=transport,
            capacity_factor=capacity_factor,
            **{'plain': {}, 'swiglu': dict(activation='swiglu'),
               'shared': dict(shared_d_ff=12)}[variant])
  mesh = _mesh(shape)
  ref = sj.moe.MoE(D, F, E, group_size=B * L // mesh.size, **kw)
  ep = sj.moe.MoE(D, F, E, mesh=mesh, **kw)
  nnx.update(ep, jax.device_get(nnx.state(ref)))
  x, ct = _inputs(k)
  got, want = _run(ep, x, ct), _run(ref, x, ct)
  _assert_same(got, want)
  assert float(got[1]['dropped_fraction']) == 0.0
  return ref, x


TRANSPORTS = ['all_to_all', 'all_gather', 'ragged_reference']
# The default tier: every transport, each mesh with an expert axis > 1, k = 1 and 2, each
# variant; the full matrix (72 cases, 8x1 included) runs with -m slow.
CORE = [('all_to_all', (2, 4), 2, 'shared'), ('all_gather', (1, 8), 2, 'swiglu'),
        ('ragged_reference', (4, 2), 1, 'plain')]
FULL = [pytest.param(t, s, k, v, marks=pytest.mark.slow)
        for t in TRANSPORTS for s in MESHES for k in (1, 2)
        for v in ('plain', 'swiglu', 'shared') if (t, s, k, v) not in CORE]


@pytest.mark.parametrize('transport,shape,k,variant', CORE + FULL)
def test_dropless_expert_parallel_matches_single_device(transport, shape, k, variant):
  _sharded_vs_single(shape, transport, k, variant)


def _sized_branch(plan, capacity_factor, ep=4):
  """The branch of 'sized' on each expert-axis group of `ep` devices (rows of plan
  [G, S, K]): 0 nothing past capacity, i > 0 the spill in buffers of spill_rows[i-1]."""
  expert, kept = np.asarray(plan.expert), np.asarray(plan.kept)
  s, k = expert.shape[1:]
  c = R.capacity(s, E, k, capacity_factor)
  sizes = EP.spill_rows(E // ep * c, EP.worst_case_rows(s, k, E, ep))
  branches = []
  for devices in np.split(np.arange(expert.shape[0]), expert.shape[0] // ep):
    need = max(np.maximum(np.bincount(expert[i][kept[i]], minlength=E) - c, 0)
               .reshape(ep, -1).sum(1).max() for i in devices)         # per destination
    branches.append(int(np.sum(need > np.array((0,) + sizes[:-1]))))
  return branches


@pytest.mark.parametrize('capacity_factor,branch', [
    pytest.param(0.5, 4, marks=pytest.mark.slow), pytest.param(1.0, 3, marks=pytest.mark.slow),
    (1.25, 1), (2.0, 0)])
def test_sized_transport_matches_single_device_at_each_branch(capacity_factor, branch):
  """'sized' sends the choices that fit capacity's [E, C, D] buffers, C = ceil(cf *
  S*K/E), and those past capacity (when a device has any) in buffers of the first of
  spill_rows that holds them: equal to the single-device layer whichever it takes. The
  data axis of 2 makes two groups of the expert axis, each deciding for itself (both
  take the same branch here, counted from the plan: buffers of 8, 4 and 1 rows, and
  none)."""
  ref, x = _sharded_vs_single((2, 4), 'sized', 2, 'swiglu', capacity_factor)
  plan, _ = ref.route(x)                                               # [G=8, S=8, K=2]
  assert _sized_branch(plan, capacity_factor) == [branch, branch]


def test_spill_rows_double_up_to_the_worst_case():
  assert EP.spill_rows(160, 1024) == (40, 80, 160, 320, 640, 1024)
  assert EP.spill_rows(2, 16) == (1, 2, 4, 8, 16)
  assert EP.spill_rows(64, 16) == (16,)


def test_spill_size_is_decided_over_the_whole_axis():
  """Device 0 sends 4 choices to expert 0 over a 3-slot capacity: every device of the
  axis sees one row past capacity for one destination; with 4 slots none. With 1 slot,
  device 0's 3 past expert 0 and 1 past expert 1 both go to device 0 (experts 0-1)."""
  mesh = jax.make_mesh((4,), ('expert',), axis_types=(AxisType.Auto,))
  expert = np.tile(np.array([[0, 2], [4, 6]]), (4, 1, 1))                # [P, S=2, K=2]
  expert[0] = [[0, 0], [0, 0]]
  expert[1] = [[0, 1], [1, 7]]

  def need(c):
    plan = lambda e: R.RoutingPlan(expert=e, weight=jnp.ones(e.shape), slot=e,
                                   kept=jnp.ones(e.shape, bool))
    f = jax.shard_map(lambda e: EP.past_capacity(plan(e[0]), 8, 4, c)[2][None],
                      mesh=mesh, in_specs=P('expert'), out_specs=P('expert'))
    return np.asarray(f(jnp.asarray(expert)))

  np.testing.assert_array_equal(need(3), [1] * 4)
  np.testing.assert_array_equal(need(4), [0] * 4)
  np.testing.assert_array_equal(need(1), [3] * 4)


@pytest.mark.parametrize('index', [0, 1])
def test_switch_keeping_residuals_is_lax_switch_with_its_gradients(index):
  """Values and gradients (of an argument, of an array a branch closes over) equal
  lax.switch's, integer arguments pass through undifferentiated; in the gradient's
  program the common branch 0 (tanh) runs once, its backward reading saved residuals,
  and branch 1 (sin) runs again in its backward, recomputed instead of saved."""
  x, i = jnp.asarray([0.3, -1.2, 2.0]), jnp.asarray([2, 0, 1])
  v, w = jnp.asarray([1.5, 0.25, -1.0]), jnp.asarray([0.5, -2.0, 3.0])

  def loss(switch, x, v, w):
    common = lambda x, i, v: jnp.tanh(x) * v[i] * w[i]                 # closes over w
    rare = lambda x, i, v: jnp.sin(x * w[i]) ** 2
    return jnp.sum(switch(jnp.asarray(index), [common, rare], x, i, v) ** 2)

  grad = lambda switch: jax.value_and_grad(loss, argnums=(1, 2, 3))(switch, x, v, w)
  got = grad(EP.switch_keeping_residuals)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(grad(jax.lax.switch))):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  text = str(jax.make_jaxpr(lambda x: grad(EP.switch_keeping_residuals))(x))
  assert len(re.findall(r'= tanh\b', text)) == 1
  assert len(re.findall(r'= sin\b', text)) == 2


@pytest.mark.skipif(CPU, reason='XLA:CPU has no ragged_all_to_all; ragged_reference '
                                'covers the transport logic above')
@pytest.mark.parametrize('shape', [(1, 8), (2, 4)])
def test_native_ragged_transport_matches_single_device(shape):
  _sharded_vs_single(shape, 'ragged', 2, 'swiglu')


def test_ragged_reference_follows_the_documented_example():
  """jax.lax.ragged_all_to_all's docstring example, through the reference collective."""
  mesh = jax.make_mesh((2,), ('expert',), axis_types=(AxisType.Auto,))
  per_device = dict(operand=[[1, 2, 2], [3, 4, 0]], output=[[0] * 4] * 2,
                    input_offsets=[[0, 1], [0, 1]], send_sizes=[[1, 2], [1, 1]],
                    output_offsets=[[0, 0], [1, 2]], recv_sizes=[[1, 1], [2, 1]])
  args = [jnp.asarray(v, jnp.int32).reshape(-1) for v in per_device.values()]
  f = jax.shard_map(lambda *a: EP.ragged_all_to_all_reference(*a, axis_name='expert'),
                    mesh=mesh, in_specs=(P('expert'),) * 6, out_specs=P('expert'))
  np.testing.assert_array_equal(f(*args), [1, 3, 0, 0, 2, 2, 4, 0])


def _forward_hlo(shape, transport):
  mesh = _mesh(shape)
  layer = sj.moe.MoE(D, F, E, k=2, mesh=mesh, dispatch='dropless', ep_transport=transport)
  x = jax.device_put(_inputs()[0], NamedSharding(mesh, P(('data', 'expert'))))
  graphdef, state = nnx.split(layer)
  fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)[0])
  return fwd.lower(state, x).compile().as_text()


def _count(op, text):
  return len(re.findall(rf' {op}(?:-start)?\(', text))


@pytest.mark.parametrize('shape', [pytest.param((1, 8), marks=pytest.mark.slow), (2, 4)])
def test_dropless_transports_hold_the_documented_collectives(shape):
  """all_to_all: rows, their expert ids and the results, 3 all-to-alls; all_gather:
  the tokens, expert ids and weights gathered, one reduce-scatter home; sized: capacity's
  two all-to-alls, then one conditional whose branches are nothing and the spill's
  three in each buffer size. None gathers expert weights."""
  text = _forward_hlo(shape, 'all_to_all')
  assert _count('all-to-all', text) == 3
  assert _count('all-gather', text) == 0 and _count('reduce-scatter', text) == 0
  text = _forward_hlo(shape, 'all_gather')
  assert _count('all-to-all', text) == 0
  assert _count('all-gather', text) == 3 and _count('reduce-scatter', text) == 1
  # sized: the spill size is one all-reduce (max); S=8, K=2, C=3 per expert.
  text = _forward_hlo(shape, 'sized')
  sizes = EP.spill_rows(E // shape[1] * 3, EP.worst_case_rows(8, 2, E, shape[1]))
  assert _count('all-reduce', text) == 1 and _count('conditional', text) == 1
  assert _count('all-to-all', text) == 2 + 3 * len(sizes)
  assert _count('all-gather', text) == 0


@pytest.mark.parametrize('kwargs,words', [
    (dict(ep_transport='nccl'), ["ep_transport='nccl'", 'all_to_all', 'all_gather']),
    (dict(dispatch='dropless', routing='expert_choice'), ['dropless', "'index'"]),
] + ([(dict(ep_transport='ragged'), ["'ragged'", 'XLA:CPU', "'all_to_all'", "'all_gather'"])]
     if CPU else []))
def test_dropless_errors_name_value_and_fix(kwargs, words):
  with pytest.raises(ValueError) as err:
    sj.moe.MoE(D, F, E, mesh=_mesh((2, 4)), **kwargs)
  for w in words:
    assert w in str(err.value), (w, str(err.value))
