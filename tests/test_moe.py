"""MoE layer: expert-parallel runs against the single-device reference (outputs and
gradients), the compiled communication, the API's mesh variants and its errors."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import sparse_jax as sj

B, L, D, F, E = 8, 8, 16, 32, 8
MESHES = [(1, 8), (2, 4), (4, 2), (8, 1)]


def _mesh(shape, kind=AxisType.Auto):
  return jax.make_mesh(shape, ('data', 'expert'), axis_types=(kind, kind))


def _inputs(seed=0):
  kx, kc = jax.random.split(jax.random.key(seed))
  return jax.random.normal(kx, (B, L, D)), jax.random.normal(kc, (B, L, D))


def _loss(layer, x, ct):
  y, aux = layer(x, train=True)
  # Aux losses are in the objective so their (global) statistics are checked too.
  return jnp.sum(y * ct) + 0.5 * aux['load_balance_loss'] + 0.1 * aux['router_z_loss']


def _run(layer, x, ct):
  @nnx.jit
  def step(layer, x, ct):
    (loss, (g_layer, g_x)) = nnx.value_and_grad(_loss, argnums=(0, 1))(layer, x, ct)
    y, aux = layer(x)
    return y, aux, loss, g_layer, g_x
  return jax.device_get(step(layer, x, ct))


def _copy_params(src, dst):
  nnx.update(dst, jax.device_get(nnx.state(src)))


def _assert_sharded_matches(mesh, seed=0, **kw):
  """Build the layer on `mesh` and its single-device reference (routing the same groups:
  the tokens each device holds) with equal parameters; compare outputs, aux, the loss and
  the gradients for x and every parameter. Returns the reference's aux."""
  ref = sj.moe.MoE(D, F, E, group_size=B * L // mesh.size, **kw)
  ep = sj.moe.MoE(D, F, E, mesh=mesh, **kw)
  _copy_params(ref, ep)
  x, ct = _inputs(seed)
  y0, aux0, loss0, g0, gx0 = _run(ref, x, ct)
  y1, aux1, loss1, g1, gx1 = _run(ep, x, ct)
  np.testing.assert_allclose(y1, y0, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(loss1, loss0, rtol=1e-5)
  for name in aux0:                               # 'stats' is a dict of arrays
    jax.tree.map(lambda a, b, name=name: np.testing.assert_allclose(
        a, b, atol=1e-6, rtol=1e-5, err_msg=name), aux1[name], aux0[name])
  np.testing.assert_allclose(gx1, gx0, atol=1e-5, rtol=1e-5)
  flat0, flat1 = nnx.to_flat_state(g0), dict(nnx.to_flat_state(g1))
  assert len(flat0) == len(flat1) >= 3
  for path, v in flat0:
    np.testing.assert_allclose(flat1[path][...], v[...], atol=1e-5, rtol=1e-4,
                               err_msg=str(path))
  return aux0


# The default tier covers every code path: expert axis 8 (all-to-all only), 4 (both
# axes), 1 (data parallel only) x k in {1, 2}, with drops; one case without drops; both
# expert computations. The full matrix runs with -m slow.
FULL = [pytest.param(shape, k, cf, compute, marks=pytest.mark.slow)
        for shape in MESHES for k, cf in [(1, 1.0), (1, 8.0), (2, 1.0), (2, 8.0)]
        for compute in sj.moe.EXPERT_COMPUTE]
CORE = [(shape, k, 1.0, 'loop') for shape in [(1, 8), (2, 4), (8, 1)] for k in (1, 2)] + [
    ((2, 4), 2, 8.0, 'loop'), ((2, 4), 2, 1.0, 'batched')]


@pytest.mark.parametrize('shape,k,cf,compute', CORE + [
    p for p in FULL if tuple(p.values[:4]) not in CORE])
def test_expert_parallel_matches_single_device(shape, k, cf, compute):
  aux = _assert_sharded_matches(_mesh(shape), k=k, capacity_factor=cf, rngs=nnx.Rngs(3),
                                expert_compute=compute)
  # The drop path is really exercised at cf=1.0, and absent at cf=8.
  assert (aux['dropped_fraction'] > 0) == (cf == 1.0)


def test_expert_computations_agree():
  """'loop' (XLA:CPU's choice) and 'batched' (accelerators') are one function."""
  mk = lambda compute: sj.moe.Experts(E, D, F, activation='swiglu', compute=compute,
                                      rngs=nnx.Rngs(0))
  loop, batched = mk('loop'), mk('batched')
  x = jax.random.normal(jax.random.key(0), (E, 5, D))
  np.testing.assert_allclose(loop.apply(loop.weights(), x),
                             batched.apply(batched.weights(), x), rtol=1e-5, atol=1e-6)
  assert sj.moe.MoE(D, F, E).experts.compute == sj.moe.default_expert_compute() == 'loop'


def test_route_returns_the_plan_the_layer_uses():
  """MoE.route groups as the layer does (the tokens each device holds) and its plan
  reproduces the layer's output through the index backend."""
  mesh = _mesh((2, 4))
  layer = sj.moe.MoE(D, F, E, k=2, capacity_factor=1.0, mesh=mesh, rngs=nnx.Rngs(2))
  x, _ = _inputs(5)
  plan, c = layer.route(x)
  s = B * L // 8
  assert plan.expert.shape == (8, s, 2) and c == sj.routing.capacity(s, E, 2, 1.0)
  xg = np.asarray(x).reshape(8, s, D)
  slots, ctx = sj.dispatch.index_dispatch(jnp.asarray(xg), plan, E, c)
  out = layer.experts.apply(jax.device_get(layer.experts.weights()), slots)
  y = sj.dispatch.index_combine(out, plan, ctx).reshape(B, L, D)
  y_layer, aux = jax.device_get(nnx.jit(lambda m, x: m(x))(layer, x))
  np.testing.assert_allclose(y, y_layer, rtol=1e-5, atol=1e-5)
  assert float(aux['dropped_fraction']) == pytest.approx(1 - float(plan.kept.mean()))


@pytest.mark.parametrize('dispatch,shape', [('einsum', (2, 4)), ('dropless', (8, 1)),
                                            ('einsum', (8, 1))])
def test_other_backends_on_a_mesh_match_single_device(dispatch, shape):
  aux = _assert_sharded_matches(_mesh(shape), seed=4, k=2, capacity_factor=1.0,
                                dispatch=dispatch, rngs=nnx.Rngs(5))
  assert (aux['dropped_fraction'] > 0) == (dispatch != 'dropless')


def test_bfloat16_experts_keep_a_float32_router():
  layer = sj.moe.MoE(D, F, E, param_dtype=jnp.bfloat16)
  x = _inputs()[0].astype(jnp.bfloat16)
  assert layer.experts.wi[...].dtype == jnp.bfloat16
  assert layer.router.kernel[...].dtype == jnp.float32
  assert layer.router(x).dtype == jnp.float32
  y, aux = nnx.jit(lambda m, x: m(x))(layer, x)
  assert y.dtype == jnp.bfloat16 and aux['load_balance_loss'].dtype == jnp.float32
  assert np.isfinite(np.asarray(y, np.float32)).all()


def _hlo(mesh, dispatch='index'):
  layer = sj.moe.MoE(D, F, E, mesh=mesh, dispatch=dispatch)
  x = jax.device_put(_inputs()[0], NamedSharding(mesh, P(('data', 'expert'))))
  graphdef, state = nnx.split(layer)
  fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)[0])
  return fwd.lower(state, x).compile().as_text()


@pytest.mark.parametrize('shape', [(2, 4), (1, 8)])
def test_forward_has_two_all_to_alls_and_no_weight_gather(shape):
  text = _hlo(_mesh(shape))
  assert len(re.findall(r' all-to-all(?:-start)?\(', text)) == 2
  assert not re.findall(r' all-gather(?:-start)?\(', text)


def test_expert_axis_one_has_no_all_to_all():
  text = _hlo(_mesh((8, 1)))
  assert not re.findall(r' all-to-all(?:-start)?\(', text)


@pytest.mark.parametrize('kind', [AxisType.Auto, AxisType.Explicit])
@pytest.mark.parametrize('use_set_mesh', [False, True])
@pytest.mark.parametrize('placed', [False, True])
def test_mesh_variants(kind, use_set_mesh, placed):
  """Either axis type, with or without jax.set_mesh, inputs placed or not, under jit."""
  mesh = _mesh((2, 4), kind)
  ref = sj.moe.MoE(D, F, E, k=2, group_size=B * L // 8)
  x, _ = _inputs()
  forward = nnx.jit(lambda m, x: m(x)[0])
  y0 = forward(ref, x)
  if placed:
    x = jax.device_put(x, NamedSharding(mesh, P(('data', 'expert'))))

  def run():
    layer = sj.moe.MoE(D, F, E, k=2, mesh=mesh)
    _copy_params(ref, layer)
    return forward(layer, x)

  if use_set_mesh:
    with jax.set_mesh(mesh):
      y = run()
  else:
    y = run()
  np.testing.assert_allclose(jax.device_get(y), y0, atol=1e-5)


@pytest.mark.slow
def test_eager_call_on_a_mesh():
  """Op by op (no jit) on a mesh: slow, hence only in the slow tier."""
  mesh = _mesh((2, 4))
  ref = sj.moe.MoE(D, F, E, k=2, group_size=B * L // 8)
  layer = sj.moe.MoE(D, F, E, k=2, mesh=mesh)
  _copy_params(ref, layer)
  x, _ = _inputs()
  np.testing.assert_allclose(jax.device_get(layer(x)[0]), ref(x)[0], atol=1e-5)


def test_expert_weights_are_sharded_over_expert_axis():
  mesh = _mesh((2, 4))
  layer = sj.moe.MoE(D, F, E, mesh=mesh)
  assert layer.experts.wi[...].sharding.spec == P('expert', None, None)
  assert layer.experts.wi[...].addressable_shards[0].data.shape == (E // 4, D, F)


@pytest.mark.parametrize('activation', ['relu', 'swiglu'])
def test_activation_and_shared_expert_under_expert_parallelism(activation):
  _assert_sharded_matches(_mesh((2, 4)), seed=1, activation=activation, shared_d_ff=8,
                          rngs=nnx.Rngs(1))


def test_public_parameter_shapes():
  layer = sj.moe.MoE(D, F, E, activation='swiglu', shared_d_ff=8)
  assert layer.router.kernel[...].shape == (D, E)
  assert layer.experts.wi[...].shape == layer.experts.wi_gate[...].shape == (E, D, F)
  assert layer.experts.wo[...].shape == (E, F, D)
  assert not hasattr(sj.moe.MoE(D, F, E).experts, 'wi_gate')


def test_expert_ffn_matches_the_documented_formula():
  """Unlimited capacity, k=1: y = probs[e] * gelu(x @ wi[e]) @ wo[e] per token."""
  layer = sj.moe.MoE(D, F, E, k=1, capacity_factor=float(E))
  x, _ = _inputs(2)
  y, _ = layer(x)
  xt = np.asarray(x).reshape(-1, D)
  logits = xt @ np.asarray(layer.router.kernel[...])
  probs = np.asarray(jax.nn.softmax(logits))
  wi, wo = np.asarray(layer.experts.wi[...]), np.asarray(layer.experts.wo[...])
  want = np.stack([probs[t, e] * np.asarray(jax.nn.gelu(xt[t] @ wi[e])) @ wo[e]
                   for t, e in enumerate(probs.argmax(-1))])
  np.testing.assert_allclose(np.asarray(y).reshape(-1, D), want, atol=1e-5, rtol=1e-5)


def test_loss_free_bias_moves_towards_balance_and_only_in_training():
  layer = sj.moe.MoE(D, F, E, balancing='loss_free', bias_rate=0.01)
  x, _ = _inputs()
  _, aux = layer(x)                               # eval: bias untouched
  assert np.all(layer.router.bias[...] == 0)
  _, aux = layer(x, train=True)
  load = np.asarray(aux['expert_load'])
  bias = np.asarray(layer.router.bias[...])
  np.testing.assert_allclose(bias, 0.01 * np.sign(load.mean() - load))
  assert 'bias' not in dict(nnx.to_flat_state(nnx.state(layer, nnx.Param)))


def test_router_jitter_only_in_training():
  layer = sj.moe.MoE(D, F, E, router_jitter=0.1, rngs=nnx.Rngs(0))
  x, _ = _inputs()
  a, b = layer.router(x), layer.router(x)
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(layer.router(x, train=True), a)


def test_expert_choice_layer_and_causal_refusal():
  with pytest.raises(ValueError, match='allow_lookahead'):
    sj.moe.MoE(D, F, E, routing='expert_choice', causal=True)
  layer = sj.moe.MoE(D, F, E, routing='expert_choice', capacity_factor=1.0)
  y, aux = layer(_inputs()[0])
  assert y.shape == (B, L, D)
  np.testing.assert_allclose(aux['expert_load'], np.full(E, 1 / E), atol=1e-6)
  layer = sj.moe.MoE(D, F, E, routing='expert_choice', causal=True, allow_lookahead=True)
  assert layer(_inputs()[0])[0].shape == (B, L, D)


@pytest.mark.parametrize('kwargs,words', [
    (dict(num_experts=6, mesh=(2, 4)), ['6', '4']),
    (dict(k=9), ['k=9', '8']),
    (dict(capacity_factor=0.0), ['capacity_factor=0.0', '> 0']),
    (dict(capacity_factor=-1), ['capacity_factor=-1']),
    (dict(dispatch='scatter'), ["'scatter'", 'index', 'einsum', 'dropless']),
    (dict(activation='tanh'), ["'tanh'", 'gelu']),
    (dict(routing='hash'), ["'hash'", 'top_k']),
])
def test_constructor_errors_name_value_and_fix(kwargs, words):
  kwargs = dict(kwargs)
  if 'mesh' in kwargs:
    kwargs['mesh'] = _mesh(kwargs['mesh'])
  args = dict(d_model=D, d_ff=F, num_experts=kwargs.pop('num_experts', E))
  with pytest.raises(ValueError) as err:
    sj.moe.MoE(**args, **kwargs)
  for w in words:
    assert w in str(err.value), (w, str(err.value))


def test_call_errors():
  layer = sj.moe.MoE(D, F, E)
  with pytest.raises(ValueError, match=r'\[B, L, D\].*\(64, 16\)'):
    layer(jnp.zeros((64, D)))
  with pytest.raises(ValueError, match='D=16'):
    layer(jnp.zeros((2, 4, 8)))
  ep = sj.moe.MoE(D, F, E, mesh=_mesh((2, 4)))
  with pytest.raises(ValueError, match='Batch size 4 .* 8 token shards'):
    ep(jnp.zeros((4, L, D)))
  grouped = sj.moe.MoE(D, F, E, group_size=7)
  with pytest.raises(ValueError, match='group_size=7'):
    grouped(jnp.zeros((B, L, D)))


def test_load_balance_loss_gradient_is_global_under_data_parallelism():
  """The balance loss alone: its router gradient on 8 data shards equals one device's,
  because the statistics it is made of are psummed over all shards, not per shard."""
  mesh = _mesh((8, 1))
  ref = sj.moe.MoE(D, F, E, group_size=B * L // 8, rngs=nnx.Rngs(6))
  dp = sj.moe.MoE(D, F, E, mesh=mesh, rngs=nnx.Rngs(6))
  x, _ = _inputs(6)
  grad = nnx.jit(nnx.grad(lambda m, x: m(x, train=True)[1]['load_balance_loss']))
  g0, g1 = grad(ref, x).router.kernel[...], grad(dp, x).router.kernel[...]
  assert float(jnp.abs(g0).max()) > 1e-4
  np.testing.assert_allclose(g1, g0, rtol=1e-5, atol=1e-7)


def test_bfloat16_compute_routes_on_float32_logits():
  """float32 parameters, bfloat16 activations: experts compute in bfloat16, the router
  takes its decisions from float32 logits of the same input."""
  layer = sj.moe.MoE(D, F, E, k=2, rngs=nnx.Rngs(7))
  x = _inputs(7)[0].astype(jnp.bfloat16)
  y, aux = nnx.jit(lambda m, x: m(x))(layer, x)
  assert y.dtype == jnp.bfloat16 and aux['load_balance_loss'].dtype == jnp.float32
  logits = jnp.einsum('bld,de->ble', x.astype(jnp.float32), layer.router.kernel[...])
  assert layer.router(x).dtype == jnp.float32
  np.testing.assert_array_equal(layer.router(x), logits)
  plan, c = layer.route(x)
  want = sj.routing.route_top_k(logits.reshape(-1, E), 2, c, normalize_weights=True)
  np.testing.assert_array_equal(plan.expert[0], want.expert)
  np.testing.assert_array_equal(plan.weight[0], want.weight)
