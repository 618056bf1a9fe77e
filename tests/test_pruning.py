"""sparse_jax.pruning: exact counts, schedules, scopes, ERK, N:M, scorers, the optax
wrapper (plain dicts, jit, nnx.Optimizer) and structured groups, mostly by hand."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st

from sparse_jax import pruning
from sparse_jax.config import base_config, model_spec
from sparse_jax.models import TransformerLM
from sparse_jax.pruning import wrapper as wrapper_lib


def _zeros(x):
  return int(np.sum(np.asarray(x) == 0))


def _run(tx, params, grads, steps, jit=True):
  """Apply tx for `steps` updates with fixed grads; returns per-step (params, state)."""
  def step(p, s):
    u, s = tx.update(grads, s, p)
    return optax.apply_updates(p, u), s
  step = jax.jit(step) if jit else step
  state = tx.init(params)
  out = []
  for _ in range(steps):
    params, state = step(params, state)
    out.append((params, state))
  return out


def _ffn(*shapes, seed=0):
  """A params dict whose leaves are named like prunable FFN kernels."""
  names = ['wi', 'wo', 'wi_gate']
  keys = jax.random.split(jax.random.key(seed), len(shapes))
  return {'ffn': {n: jax.random.normal(k, s) for n, k, s in zip(names, keys, shapes)}}


def _ones_like(tree):
  return jax.tree.map(jnp.ones_like, tree)


# ---- pure mask math -------------------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(st.sampled_from([1, 3]), st.sampled_from([1, 5, 12]), st.floats(0, 0.999),
       st.integers(0, 3), st.integers(0, 2**16))
def test_prune_lowest_exact_count_with_ties(rows, g, s, levels, seed):
  scores = jnp.asarray(np.random.default_rng(seed).integers(0, levels + 1, (rows, g)),
                       jnp.float32)                                   # many ties
  k = round(s * g)
  keep = np.asarray(pruning.prune_lowest(scores, k))
  assert (np.sum(~keep, axis=1) == k).all()
  for r in range(rows):       # every pruned score <= every kept score
    if 0 < k < g:
      assert scores[r][~keep[r]].max() <= scores[r][keep[r]].min()


def test_hand_2x4_kernel_magnitude_and_ties():
  w = jnp.array([[1.0, -5.0, 0.5, 2.0],
                 [3.0, -0.1, 4.0, 0.5]])
  # s = 0.25 -> 2 zeros: |-0.1| and the first of the tied 0.5s (index 2 before 7).
  keep = pruning.sparsity_mask(jnp.abs(w), 0.25)
  np.testing.assert_array_equal(keep, [[1, 1, 0, 1], [1, 0, 1, 1]])
  # s = 0.5 -> 4 zeros: 0.1, both 0.5s and 1.
  tx = pruning.wrap(optax.sgd(0.0), 0.5, schedule='one_shot')
  (p, state), = _run(tx, {'ffn': {'wi': w}}, {'ffn': {'wi': jnp.ones_like(w)}}, 1)
  np.testing.assert_array_equal(p['ffn']['wi'], [[0, -5, 0, 2], [3, 0, 4, 0]])
  np.testing.assert_array_equal(pruning.masks(state)['ffn']['wi'], p['ffn']['wi'] != 0)


@pytest.mark.parametrize('s', [0.1, 0.3, 0.7])
def test_each_layer_has_round_s_size_zeros(s):
  params = _ffn((3, 5), (7, 3), (2, 5, 3))
  (p, _), = _run(pruning.wrap(optax.adam(1e-3), s, schedule='one_shot'), params,
                 _ones_like(params), 1)
  for name, leaf in p['ffn'].items():
    assert _zeros(leaf) == round(s * leaf.size), name


# ---- schedules ------------------------------------------------------------------------

def test_cubic_schedule_values():
  f = lambda t: pruning.gmp_sparsity(t, 0.8, 10, 50)
  assert f(10) == 0.0 and f(50) == pytest.approx(0.8) and f(90) == pytest.approx(0.8)
  assert f(20) == pytest.approx(0.8 * (1 - 0.75 ** 3))       # 0.4625
  assert f(30) == pytest.approx(0.7)                         # 0.8 * (1 - 1/8)
  assert f(40) == pytest.approx(0.8 * (1 - 0.25 ** 3))
  assert pruning.update_steps('gmp', 10, 50, 10) == [10, 20, 30, 40, 50]
  assert pruning.target_sparsity(5, sparsity=0.8, schedule='gmp', start_step=10,
                                 end_step=50) == 0.0


def test_gmp_masks_change_only_at_update_steps_and_freeze_after_end():
  params = _ffn((8, 10), (10, 6))
  tx = pruning.wrap(optax.adam(0.05), 0.8, start_step=10, end_step=50, update_every=10)
  hist = _run(tx, params, jax.tree.map(lambda x: -x, params), 80)
  prev = None
  for i, (_, state) in enumerate(hist):                      # update call i saw step i
    m = pruning.masks(state)['ffn']
    for name, leaf in params['ffn'].items():
      expect = 0 if i < 10 else round(pruning.gmp_sparsity(
          i - (i - 10) % 10 if i <= 50 else 50, 0.8, 10, 50) * leaf.size)
      assert _zeros(m[name]) == expect, (i, name)
      assert _zeros(hist[i][0]['ffn'][name]) == expect
    if prev is not None:
      changed = any((np.asarray(m[n]) != np.asarray(prev[n])).any() for n in m)
      assert not changed or (i in (20, 30, 40, 50)), i        # 10 prunes 0 entries
      if changed:       # nested: nothing pruned comes back
        assert all((np.asarray(prev[n]) | ~np.asarray(m[n])).all() for n in m)
    prev = m


def test_one_shot_prunes_at_start_step_then_stays():
  params = _ffn((6, 8))
  tx = pruning.wrap(optax.sgd(0.1), 0.5, schedule='one_shot', start_step=3)
  hist = _run(tx, params, _ones_like(params), 8)
  counts = [_zeros(pruning.masks(s)['ffn']['wi']) for _, s in hist]
  assert counts == [0, 0, 0, 24, 24, 24, 24, 24]
  assert all((pruning.masks(s)['ffn']['wi'] == pruning.masks(hist[3][1])['ffn']['wi']).all()
             for _, s in hist[3:])


@pytest.mark.parametrize('extra', [{}, dict(distribution='erk'), dict(scope='global'),
                                   dict(structure='ffn_neurons')])
def test_device_counts_match_host_table(monkeypatch, extra):
  params = _ffn((9, 7), (7, 9), (9, 7))
  grads = jax.tree.map(lambda x: -x, params)
  kw = dict(sparsity=0.6, start_step=0, end_step=6, update_every=3) | extra
  ref = _run(pruning.wrap(optax.adam(0.01), **kw), params, grads, 8)
  assert _zeros(pruning.masks(ref[-1][1])['ffn']['wo']) > 0
  monkeypatch.setattr(wrapper_lib, 'MAX_TABLE_STEPS', 0)     # force the f32 device path
  got = _run(pruning.wrap(optax.adam(0.01), **kw), params, grads, 8)
  for (_, a), (_, b) in zip(ref, got):
    jax.tree.map(np.testing.assert_array_equal, pruning.masks(a), pruning.masks(b))


def test_structured_gmp_prunes_whole_neurons_on_schedule():
  params = _ffn((4, 8), (8, 4), (4, 8))                              # wi, wo, wi_gate
  tx = pruning.wrap(optax.sgd(0.01), 0.5, end_step=4, update_every=2,
                    structure='ffn_neurons')
  hist = _run(tx, params, _ones_like(params), 5)
  for i, dead in [(1, 0), (2, round(0.5 * (1 - 0.5 ** 3) * 8)), (4, 4)]:
    m = pruning.masks(hist[i][1])['ffn']
    cols = ~np.asarray(m['wi']).any(0)
    assert cols.sum() == dead, i
    np.testing.assert_array_equal(~np.asarray(m['wi_gate']).any(0), cols)
    np.testing.assert_array_equal(~np.asarray(m['wo']).any(1), cols)


# ---- scope and distribution -----------------------------------------------------------

def test_global_vs_layer_scope_by_hand():
  params = {'ffn': {'wi': jnp.array([[1.0, 2.0], [3.0, 4.0]]),
                    'wo': jnp.array([[10.0, 0.5], [30.0, 40.0]])}}
  grads = _ones_like(params)
  one = dict(schedule='one_shot')
  (pl, _), = _run(pruning.wrap(optax.sgd(0.0), 0.5, scope='layer', **one), params, grads, 1)
  np.testing.assert_array_equal(pl['ffn']['wi'], [[0, 0], [3, 4]])
  np.testing.assert_array_equal(pl['ffn']['wo'], [[0, 0], [30, 40]])
  # Global: the 4 smallest of all 8 are 0.5, 1, 2, 3.
  (pg, _), = _run(pruning.wrap(optax.sgd(0.0), 0.5, scope='global', **one), params, grads, 1)
  np.testing.assert_array_equal(pg['ffn']['wi'], [[0, 0], [0, 4]])
  np.testing.assert_array_equal(pg['ffn']['wo'], [[10, 0], [30, 40]])


def test_erk_densities_by_hand():
  # [4, 4]: ratio 8/16 = 0.5; [2, 8]: 10/16 = 0.625. s = 0.5 -> 16 non-zeros of 32:
  # eps = 16 / (0.5*16 + 0.625*16) = 8/9.
  d = pruning.erk_densities([(4, 4), (2, 8)], 0.5)
  np.testing.assert_allclose(d, [4 / 9, 5 / 9])
  np.testing.assert_array_equal(pruning.zeros_per_layer(0.5, [(4, 4), (2, 8)], 'erk'), [9, 7])
  # [1, 8]: ratio 9/8; [8, 8]: 0.25. eps = 36 / (9 + 16) = 1.44 -> 1.62 > 1: [1, 8] dense,
  # then eps = (36 - 8) / 16 = 1.75 -> [8, 8] density 0.4375 (36 zeros).
  np.testing.assert_allclose(pruning.erk_densities([(1, 8), (8, 8)], 0.5), [1.0, 0.4375])
  np.testing.assert_array_equal(pruning.zeros_per_layer(0.5, [(1, 8), (8, 8)], 'erk'), [0, 36])
  # Stacked experts use the per-expert kernel shape: [3, 4, 4] is as dense as [4, 4].
  np.testing.assert_allclose(pruning.erk_densities([(3, 4, 4), (4, 4)], 0.5), [0.5, 0.5])
  assert pruning.erk_densities([], 0.5).shape == (0,)        # nothing prunable: no layers


def test_erk_through_the_wrapper_keeps_small_layer_dense():
  params = _ffn((1, 8), (8, 8))
  (p, state), = _run(pruning.wrap(optax.sgd(0.0), 0.5, schedule='one_shot',
                                  distribution='erk'), params, _ones_like(params), 1)
  assert _zeros(p['ffn']['wi']) == 0 and _zeros(p['ffn']['wo']) == 36


# ---- N:M ------------------------------------------------------------------------------

@pytest.mark.parametrize('shape', [(8, 6), (2, 8, 6)])
def test_n_m_exactly_n_per_group_along_input_axis(shape):
  params = {'ffn': {'wi': jax.random.normal(jax.random.key(1), shape)}}
  tx = pruning.wrap(optax.adam(1e-2), 0.9, schedule='gmp', start_step=2, end_step=10,
                    update_every=1, n_m=(2, 4))
  hist = _run(tx, params, _ones_like(params), 6)
  assert _zeros(pruning.masks(hist[1][1])['ffn']['wi']) == 0        # before start_step
  runs = lambda x: np.moveaxis(np.asarray(x), -2, -1).reshape(-1, 4)  # M along axis -2
  assert ((runs(hist[2][0]['ffn']['wi']) != 0).sum(-1) == 2).all()
  # The kept ones are the 2 largest |w| of each group.
  keep, orig = runs(pruning.masks(hist[2][1])['ffn']['wi']), np.abs(runs(params['ffn']['wi']))
  assert (keep.sum(-1) == 2).all()
  assert (np.where(keep, orig, np.inf).min(-1) > np.where(keep, -1, orig).max(-1)).all()
  for _, s in hist[3:]:                                             # one-shot: fixed
    np.testing.assert_array_equal(pruning.masks(s)['ffn']['wi'],
                                  pruning.masks(hist[2][1])['ffn']['wi'])


def test_n_m_mask_function_and_bad_shape_error():
  keep = pruning.n_m_mask(jnp.array([[1.0], [4.0], [3.0], [2.0]]), 1, 4)
  np.testing.assert_array_equal(keep[:, 0], [False, True, False, False])
  tx = pruning.wrap(optax.sgd(0.1), n_m=(2, 4), schedule='one_shot')
  with pytest.raises(ValueError, match=r'ffn/wi.*\(6, 8\).*M=4'):
    tx.init({'ffn': {'wi': jnp.ones((6, 8))}})


# ---- scorers --------------------------------------------------------------------------

def test_saliency_prunes_smallest_w_times_g():
  w = jnp.array([[1.0, 2.0], [3.0, 4.0]])
  g = jnp.array([[4.0, 1.0], [0.1, 1.0]])                          # |w g| = 4, 2, 0.3, 4
  tx = pruning.wrap(optax.sgd(0.0), 0.5, method='saliency', schedule='one_shot')
  (p, _), = _run(tx, {'ffn': {'wi': w}}, {'ffn': {'wi': g}}, 1)
  np.testing.assert_array_equal(p['ffn']['wi'], [[1, 0], [0, 4]])   # magnitude: [[0,0],[3,4]]


def test_random_is_seeded_and_exact():
  params = _ffn((16, 16))
  grads = _ones_like(params)
  mask = lambda seed: np.asarray(pruning.masks(_run(pruning.wrap(
      optax.sgd(0.0), 0.5, method='random', schedule='one_shot', seed=seed),
      params, grads, 1)[0][1])['ffn']['wi'])
  a, b, c = mask(0), mask(0), mask(1)
  np.testing.assert_array_equal(a, b)
  assert (a != c).any() and _zeros(a) == _zeros(c) == 128
  # Not the magnitude mask.
  assert (a != np.asarray(pruning.sparsity_mask(jnp.abs(params['ffn']['wi']), 0.5))).any()


# ---- the wrapper ----------------------------------------------------------------------

def test_pruned_stay_exactly_zero_under_adam_momentum():
  params = _ffn((12, 10), (10, 12))
  grads = jax.tree.map(lambda x: -jnp.sign(x) * 3.0, params)        # push |w| up hard
  tx = pruning.wrap(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(0.1, b1=0.99)),
                    0.75, start_step=0, end_step=20, update_every=5)
  hist = _run(tx, params, grads, 60)
  for i, (p, s) in enumerate(hist):
    m = pruning.masks(s)
    for n in p['ffn']:
      pm = np.asarray(p['ffn'][n])
      assert (pm[~np.asarray(m['ffn'][n])] == 0).all(), (i, n)       # exactly 0, not tiny
  final = hist[-1][0]['ffn']
  assert [_zeros(final[n]) for n in ('wi', 'wo')] == [90, 90]


def test_masks_layout_and_none_for_unpruned_leaves():
  params = {'embed': jnp.ones((5, 4)), 'norm': {'scale': jnp.ones(4)},
            'ffn': {'wi': jnp.ones((4, 8)), 'wo': jnp.ones((8, 4)), 'bias': jnp.ones(8)},
            'router': {'kernel': jnp.ones((4, 2))}, 'attn': {'wq': jnp.ones((4, 4))}}
  state = pruning.wrap(optax.sgd(0.1), 0.5, end_step=10, update_every=5).init(params)
  assert isinstance(state, pruning.PruneState) and state.step.dtype == jnp.int32
  m = pruning.masks(state)
  assert m['embed'] is None and m['norm']['scale'] is None and m['ffn']['bias'] is None
  assert m['router']['kernel'] is None
  for path in (('ffn', 'wi'), ('ffn', 'wo'), ('attn', 'wq')):
    leaf = m[path[0]][path[1]]
    assert leaf.dtype == jnp.bool_ and leaf.shape == params[path[0]][path[1]].shape
    assert bool(leaf.all())                                          # before any pruning
  chained = optax.chain(optax.identity(),
                        pruning.wrap(optax.sgd(0.1), 0.5, end_step=10, update_every=5))
  assert jax.tree.structure(pruning.masks(chained.init(params))) == jax.tree.structure(m)


def test_jit_and_eager_agree():
  params = _ffn((6, 6), (6, 6))
  grads = jax.tree.map(lambda x: x * 0.3 + 0.1, params)
  mk = lambda: pruning.wrap(optax.adam(0.05), 0.5, method='saliency', end_step=6,
                            update_every=2)
  a = _run(mk(), params, grads, 7, jit=True)
  b = _run(mk(), params, grads, 7, jit=False)
  for (pa, sa), (pb, sb) in zip(a, b):
    jax.tree.map(np.testing.assert_array_equal, pruning.masks(sa), pruning.masks(sb))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), pa, pb)


def test_prunable_gets_plain_paths():
  seen = []
  params = {'blocks': [{'mlp': {'w': jnp.ones((4, 4))}}], 'head': jnp.ones((4, 2))}

  def prunable(path, leaf):
    seen.append(path)
    return path[-1] == 'w'
  tx = pruning.wrap(optax.sgd(0.1), 0.5, schedule='one_shot', prunable=prunable)
  (p, s), = _run(tx, params, _ones_like(params), 1)
  assert set(seen) == {('blocks', 0, 'mlp', 'w'), ('head',)}
  assert _zeros(p['blocks'][0]['mlp']['w']) == 8 and _zeros(p['head']) == 0
  assert pruning.plain_path((jax.tree_util.DictKey('a'), jax.tree_util.SequenceKey(3),
                             jax.tree_util.GetAttrKey('value'))) == ('a', 3)


def test_bfloat16_params_reach_exact_zero():
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _ffn((8, 8)))
  (p, _), = _run(pruning.wrap(optax.adam(0.1), 0.5, schedule='one_shot'), params,
                 _ones_like(params), 1)
  assert p['ffn']['wi'].dtype == jnp.bfloat16 and _zeros(p['ffn']['wi']) == 32


@pytest.mark.parametrize('kwargs, match', [
    (dict(sparsity=1.0), r'sparsity=1\.0 .*\[0, 1\)'),
    (dict(sparsity=-0.1), r'sparsity'),
    (dict(method='taylor'), r"method='taylor'.*magnitude.*random.*saliency"),
    (dict(schedule='cosine'), r"schedule='cosine'.*gmp.*one_shot"),
    (dict(distribution='er'), r"distribution='er'.*uniform.*erk"),
    (dict(scope='model'), r"scope='model'.*layer.*global"),
    (dict(end_step=0), r'end_step'),
    (dict(end_step=None), r'end_step'),
    (dict(update_every=0), r'update_every=0'),
    (dict(n_m=(4, 4)), r'n_m=\(4, 4\).*N < M'),
    (dict(n_m=(2, 4), structure='heads', num_heads=2), r'n_m.*structure'),
    (dict(structure='rows'), r"structure='rows'.*ffn_neurons"),
    (dict(structure='heads'), r'num_heads'),
    (dict(structure='experts', distribution='erk'), r'uniform'),
])
def test_bad_arguments_raise_eagerly(kwargs, match):
  kw = dict(sparsity=0.5, end_step=10) | kwargs
  with pytest.raises(ValueError, match=match):
    pruning.wrap(optax.sgd(0.1), **kw)


def test_unaligned_end_step_warns():
  with pytest.warns(UserWarning, match='last mask update is at step 9'):
    pruning.wrap(optax.sgd(0.1), 0.5, end_step=10, update_every=3)


def test_update_without_params_raises():
  params = _ffn((4, 4))
  tx = pruning.wrap(optax.sgd(0.1), 0.5, end_step=10, update_every=5)
  with pytest.raises(ValueError, match='needs params'):
    tx.update(params, tx.init(params))


# ---- the TransformerLM with nnx.Optimizer ---------------------------------------------

@pytest.fixture(scope='module')
def tiny_cfg():
  c = base_config()
  c.model.d_model, c.model.num_layers, c.model.num_heads, c.model.d_ff = 32, 2, 2, 64
  c.moe.num_experts = 4
  return c


def _tiny(cfg):
  return TransformerLM(model_spec(cfg), rngs=nnx.Rngs(0))


def _train(model, tx, steps):
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 256)

  @nnx.jit
  def step(model, opt):
    def loss_fn(model):
      logits, aux = model(tokens, train=True)
      return optax.softmax_cross_entropy_with_integer_labels(logits, tokens).mean()
    opt.update(model, nnx.grad(loss_fn)(model))
  for _ in range(steps):
    step(model, opt)
  return opt


def test_nnx_optimizer_prunes_only_ffn_and_attention_kernels(tiny_cfg):
  model = _tiny(tiny_cfg)
  before = nnx.state(model, nnx.Param)
  before = jax.tree.map(np.asarray, before)
  opt = _train(model, pruning.wrap(optax.adamw(1e-2), 0.5, start_step=0, end_step=4,
                                   update_every=2), 5)
  after = nnx.state(model, nnx.Param)
  masks = pruning.masks(opt.opt_state)
  m_flat = dict((pruning.plain_path(p), m) for p, m in jax.tree_util.tree_flatten_with_path(
      masks, is_leaf=lambda x: x is None)[0])
  pruned = set()
  for path, leaf in jax.tree_util.tree_flatten_with_path(after)[0]:
    path, leaf = pruning.plain_path(path), np.asarray(leaf)
    if path[-1] in ('wi', 'wo', 'wq', 'wk', 'wv'):
      assert m_flat[path].shape == leaf.shape and _zeros(leaf) == leaf.size // 2, path
      pruned.add(path)
    else:
      assert m_flat[path] is None and _zeros(leaf) == 0, path        # embed, norms, router
  assert ('blocks', 1, 'ffn', 'experts', 'wi') in pruned and len(pruned) == 12
  assert ('blocks', 1, 'ffn', 'router', 'kernel') in m_flat
  assert int(opt.opt_state.step[...]) == 5


def test_structured_heads_through_the_wrapper(tiny_cfg):
  params = nnx.as_pure(nnx.state(_tiny(tiny_cfg), nnx.Param))        # real layouts
  tx = pruning.wrap(optax.adam(1e-2), 0.5, schedule='one_shot', structure='heads',
                    num_heads=2)
  (p, state), = _run(tx, params, jax.tree.map(jnp.ones_like, params), 1)
  attn = p['blocks'][0]['attn']
  wq = np.asarray(attn['wq'])
  dead = [h for h in range(2) if not wq[:, 16 * h:16 * (h + 1)].any()]
  assert len(dead) == 1
  h = dead[0]
  for n in ('wk', 'wv'):
    assert not np.asarray(attn[n])[:, 16 * h:16 * (h + 1)].any()
  assert not np.asarray(attn['wo'])[16 * h:16 * (h + 1)].any()
  assert _zeros(wq) == 512                                          # nothing else pruned
  masks = pruning.masks(state)
  assert masks['blocks'][0]['ffn']['wi'] is None                    # FFNs untouched
  assert _zeros(p['blocks'][0]['ffn']['wi']) == 0


# ---- structured masks by hand ---------------------------------------------------------

def test_structured_ffn_neurons_by_hand():
  # Neuron 0: wi[:, 0] = (3, 4), wo[0] = (0, 0) -> norm 5; neuron 1: (1, 0), (1, 1) -> sqrt 3.
  params = {'ffn': {'wi': jnp.array([[3.0, 1.0], [4.0, 0.0]]),
                    'wo': jnp.array([[0.0, 0.0], [1.0, 1.0]])}, 'embed': jnp.ones((3, 2))}
  np.testing.assert_allclose(pruning.group_scores(params, 'ffn_neurons')[('ffn',)],
                             [5.0, math.sqrt(3)], rtol=1e-6)
  masks, kept = pruning.structured_masks(params, 0.5, 'ffn_neurons')
  np.testing.assert_array_equal(masks['ffn']['wi'], [[True, False], [True, False]])
  np.testing.assert_array_equal(masks['ffn']['wo'], [[True, True], [False, False]])
  assert masks['embed'] is None and kept[('ffn',)].tolist() == [0]


def test_structured_heads_by_hand():
  # D = 2, N = 2 heads of H = 2: head 1 has small weights everywhere.
  big, small = jnp.full((2, 2), 2.0), jnp.full((2, 2), 0.1)
  qkv = jnp.concatenate([big, small], axis=1)                        # [D, N*H]
  params = {'attn': {'wq': qkv, 'wk': qkv, 'wv': qkv,
                     'wo': jnp.concatenate([big, small], axis=0)}}  # [N*H, D]
  masks, kept = pruning.structured_masks(params, 0.5, 'heads', num_heads=2)
  for n in ('wq', 'wk', 'wv'):
    np.testing.assert_array_equal(masks['attn'][n], [[1, 1, 0, 0]] * 2)
  np.testing.assert_array_equal(masks['attn']['wo'], [[1, 1], [1, 1], [0, 0], [0, 0]])
  assert kept[('attn',)].tolist() == [0]
  with pytest.raises(ValueError, match='num_heads'):
    pruning.structured_masks(params, 0.5, 'heads')


def test_structured_experts_and_per_expert_neurons_by_hand():
  # 2 experts, D = 2, F = 3. Expert 0 is small; in expert 1 neuron 2 is the weakest.
  wi = jnp.stack([jnp.full((2, 3), 0.1), jnp.array([[1.0, 2.0, 0.2], [1.0, 2.0, 0.2]])])
  wo = jnp.stack([jnp.full((3, 2), 0.1), jnp.array([[1.0, 1.0], [2.0, 2.0], [0.3, 0.3]])])
  params = {'ffn': {'experts': {'wi': wi, 'wo': wo}, 'router': {'kernel': jnp.ones((2, 2))}}}
  masks, kept = pruning.structured_masks(params, 0.5, 'experts')
  assert kept[('ffn', 'experts')].tolist() == [1]
  assert not masks['ffn']['experts']['wi'][0].any() and masks['ffn']['experts']['wo'][1].all()
  assert masks['ffn']['router']['kernel'] is None
  # Per-expert neurons: s = 0.34 -> round(1.02) = 1 of F = 3 per expert.
  masks, kept = pruning.structured_masks(params, 0.34, 'ffn_neurons')
  k = kept[('ffn', 'experts')]
  assert k.shape == (2, 2) and k[1].tolist() == [0, 1] and k[0].tolist() == [1, 2]
  np.testing.assert_array_equal(masks['ffn']['experts']['wi'][1], [[1, 1, 0]] * 2)
  np.testing.assert_array_equal(masks['ffn']['experts']['wo'][1], [[1, 1], [1, 1], [0, 0]])


def test_structured_masks_on_nnx_state(tiny_cfg):
  state = nnx.state(_tiny(tiny_cfg), nnx.Param)
  masks, kept = pruning.structured_masks(state, 0.25, 'ffn_neurons')
  assert kept[('blocks', 0, 'ffn')].shape == (48,)                  # 64 - round(16)
  assert kept[('blocks', 1, 'ffn', 'experts')].shape == (4, 48)
  wi = np.asarray(masks['blocks'][0]['ffn']['wi'])
  assert (wi.all(0) == np.isin(np.arange(64), kept[('blocks', 0, 'ffn')])).all()
  assert masks['blocks'][0]['attn']['wq'] is None and masks['embed'] is None
  _, kept = pruning.structured_masks(state, 0.5, 'heads', num_heads=2)
  assert set(kept) == {('blocks', 0, 'attn'), ('blocks', 1, 'attn')}
  _, kept = pruning.structured_masks(state, 0.5, 'experts')
  assert set(kept) == {('blocks', 1, 'ffn', 'experts')} and kept[
      ('blocks', 1, 'ffn', 'experts')].shape == (2,)


@pytest.mark.parametrize('targets,pruned_parts', [('ffn', {'ffn'}), ('attn', {'attn'})])
def test_config_targets_limit_pruning_to_one_part(tiny_cfg, targets, pruned_parts):
  from sparse_jax.config import resolve
  from sparse_jax.pruning.paths import flatten
  from sparse_jax.training.optimizer import make_optimizer
  c = tiny_cfg.copy_and_resolve_references()
  c.pruning.sparsity, c.pruning.schedule, c.pruning.targets = 0.5, 'one_shot', targets
  model = _tiny(c)
  from sparse_jax import roles
  _train(model, make_optimizer(resolve(c, 8), roles.param_roles(model)), 1)
  for path, value in zip(*flatten(nnx.state(model, nnx.Param))[:2]):
    if path[-1] in ('wi', 'wo', 'wq', 'wk', 'wv') and 'router' not in path:
      part = 'attn' if 'attn' in path else 'ffn'
      zeros = float(np.mean(np.asarray(value) == 0))
      assert zeros == (0.5 if part in pruned_parts else 0.0), (path, zeros)
