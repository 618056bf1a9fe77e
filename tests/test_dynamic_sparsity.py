"""Dynamic sparse training (pruning.wrap(schedule='dynamic')): SET, RigL and SRigL's
invariants by hand counts and a NumPy replay of each topology update, and in training."""
import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparse_jax import pruning, sharding
from sparse_jax.config import load_config
from sparse_jax.pruning import dynamic
from sparse_jax.training import checkpoint, loop

S, START, END, EVERY, ALPHA = 0.75, 2, 20, 4, 0.5


def test_drop_fraction_is_a_cosine_from_alpha_to_zero():
  f = lambda t: float(dynamic.drop_fraction(t, alpha=0.3, start_step=10, end_step=110))
  assert f(10) == pytest.approx(0.3) and f(60) == pytest.approx(0.15)
  assert f(35) == pytest.approx(0.15 * (1 + math.cos(math.pi / 4)))
  assert f(110) == pytest.approx(0.0, abs=1e-7)


def test_drop_and_grow_by_hand():
  #                     0     1      2      3     4      5
  active = jnp.array([[True, True, False, True, False, True]])
  magnitude = jnp.array([[5., 1., 9., 3., 9., 2.]])
  # Drop 2: entries 1 and 5 (|w| 1 and 2). Grow 2 among {1, 2, 4, 5}: 1 (g 9, keeps its
  # place, not 'grown') and 4 (g 8); 2 (g 7) loses to them.
  grow = jnp.array([[0., 9., 7., 0., 8., 0.]])
  new, grown = dynamic.drop_and_grow(active, magnitude, grow, 2, 2)
  np.testing.assert_array_equal(new, [[True, True, False, True, True, False]])
  np.testing.assert_array_equal(grown, [[False, False, False, False, True, False]])


def _params():
  k = jax.random.split(jax.random.key(0), 3)
  return {'ffn': {'wi': jax.random.normal(k[0], (16, 8)), 'wo': jax.random.normal(k[1], (8, 16))},
          'experts': {'wi': jax.random.normal(k[2], (4, 16, 8))}, 'norm': jnp.ones(16)}


def _rows(x, fan_in):
  return np.asarray(dynamic.to_rows(jnp.asarray(x), fan_in))


def _replay(active, w, g, zeros, n, regrow):
  """NumPy: drop the n smallest |w| active per row, grow the n best among the rest."""
  new = active.copy()
  for r in range(active.shape[0]):
    on = np.flatnonzero(active[r])
    drop = on[np.argsort(np.abs(w[r, on]), kind='stable')[:n]]
    new[r, drop] = False
    if regrow == 'gradient':       # RigL: the top-|g| entries inactive after the drop
      off = np.flatnonzero(~new[r])
      best = off[np.argsort(-np.abs(g[r, off]), kind='stable')[:n]]
      new[r, best] = True
  return new


@pytest.mark.parametrize('fan_in', dynamic.FAN_IN)
@pytest.mark.parametrize('regrow', dynamic.REGROW)
def test_dynamic_sparse_training_invariants(fan_in, regrow):
  tx = pruning.wrap(optax.adam(1e-2), sparsity=S, schedule='dynamic', start_step=START,
                    end_step=END, update_every=EVERY, regrow=regrow, fan_in=fan_in,
                    drop_fraction=ALPHA, prunable=lambda path, leaf: leaf.ndim >= 2)
  params = _params()
  state = tx.init(params)
  update = jax.jit(tx.update)
  moved = 0
  for step in range(END + 3):
    grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(step), x.shape), params)
    updates, new_state = update(grads, state, params)
    new_params = optax.apply_updates(params, updates)
    old_m, new_m = pruning.masks(state), pruning.masks(new_state)
    adam = new_state.inner[0]
    for path in (('ffn', 'wi'), ('ffn', 'wo'), ('experts', 'wi')):
      get = lambda t: t[path[0]][path[1]]
      old, new, w = np.asarray(get(old_m)), np.asarray(get(new_m)), np.asarray(get(new_params))
      shape = w.shape
      rows = _rows(new, fan_in)
      zeros = round(S * rows.shape[1])
      assert (~rows).sum(axis=1).tolist() == [zeros] * rows.shape[0] or step < START
      assert (w[~new] == 0).all()                       # dropped: exactly 0
      if step < START:
        assert new.all()
        continue
      if step == START:
        assert (~rows).sum(axis=1).tolist() == [zeros] * rows.shape[0]
        continue
      grown = new & ~old
      if (step - START) % EVERY or step >= END:
        assert not grown.any() and (new == old).all()
        continue
      # The update that grows a weight leaves it at exactly 0 and resets its moments.
      assert (w[grown] == 0).all()
      assert (np.asarray(get(adam.mu))[grown] == 0).all()
      assert (np.asarray(get(adam.nu))[grown] == 0).all()
      frac = ALPHA / 2 * (1 + math.cos(math.pi * (step - START) / (END - START)))
      n = round(np.float32(frac) * (rows.shape[1] - zeros))
      want = _replay(_rows(old, fan_in), _rows(get(params), fan_in),
                     _rows(get(grads), fan_in), zeros, n, regrow)
      if regrow == 'gradient':
        np.testing.assert_array_equal(rows, want)
      else:                                             # the same drop, random regrowth
        kept = _rows(old, fan_in) & want
        assert (rows[kept]).all() and ((rows & ~_rows(old, fan_in)).sum(axis=1) <= n).all()
      moved += int(grown.sum())
      assert np.prod(shape) > 0
    params, state = new_params, new_state
  assert moved > 0


def test_erk_with_constant_fan_in_gives_each_layer_its_own_fan_in():
  """ERK densities by hand: eps * (in + out) / (in * out) per (expert) kernel, eps = 208 /
  (40 + 16 + 64) for 25% of 832 weights kept; zeros per output = round((1 - d) * in)."""
  k = jax.random.split(jax.random.key(1), 3)
  params = {'a': jax.random.normal(k[0], (32, 8)), 'b': jax.random.normal(k[1], (8, 8)),
            'e': jax.random.normal(k[2], (2, 16, 16))}
  eps = 208 / 120
  want = {n: round((1 - eps * (i + o) / (i * o)) * i)
          for n, (i, o) in {'a': (32, 8), 'b': (8, 8), 'e': (16, 16)}.items()}
  assert want == {'a': 23, 'b': 5, 'e': 13}
  tx = pruning.wrap(optax.adam(1e-2), sparsity=S, schedule='dynamic', start_step=START,
                    end_step=END, update_every=EVERY, fan_in='constant', distribution='erk',
                    drop_fraction=ALPHA, prunable=lambda path, leaf: True)
  state, update = tx.init(params), jax.jit(tx.update)
  for step in range(START + 2 * EVERY + 1):
    grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(step), x.shape), params)
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    if step >= START:
      for name, m in pruning.masks(state).items():
        zeros = (~_rows(m, 'constant')).sum(axis=1)
        assert zeros.tolist() == [want[name]] * len(zeros), (step, name)
        assert (np.asarray(params[name])[~np.asarray(m)] == 0).all()


def test_neuron_ablation_by_hand():
  """4 neurons of 8 inputs, K = 3 (B = 12), drop fraction 0.25: 3 moves. Salient: the top
  9 |w| (neurons 0-2) and the top 3 |g| (one entry each of neurons 0-2); neuron 3 has 0 of
  the max(1, floor(0.4 * 3)) = 1 needed and is ablated; the others share B: K' = 4."""
  active = jnp.zeros((1, 4, 8), bool).at[:, :, :3].set(True)
  magnitude = jnp.where(active, jnp.array([5., 4., 3., 0.1])[None, :, None], 0.)
  grad = jnp.zeros((1, 4, 8)).at[0, 0, 5].set(9.).at[0, 1, 6].set(8.).at[0, 2, 7].set(7.)
  zeros = dynamic.ablate(active, magnitude, grad, 5, 0.25, 0.4)
  np.testing.assert_array_equal(zeros, [[4, 4, 4, 8]])
  # At least ceil(B / U) + 1 neurons stay. 4 neurons of 4 inputs, K = 2 (B = 8): salient
  # top 6 |w| and top 2 |g| (both in neuron 0) give counts [4, 2, 1, 1]; min_salient = 1
  # asks for 2, but the threshold drops to the third-ranked count, 1: nobody goes.
  small = jnp.zeros((1, 4, 4), bool).at[:, :, :2].set(True)
  w = jnp.zeros((1, 4, 4)).at[0, :, :2].set(jnp.array([[5, 5], [4, .2], [3, .1], [.3, .05]]))
  g = jnp.zeros((1, 4, 4)).at[0, 0, 2:].set(jnp.array([9., 8.]))
  np.testing.assert_array_equal(dynamic.ablate(small, w, g, 2, 0.25, 1.0), [[2, 2, 2, 2]])
  np.testing.assert_array_equal(dynamic.ablate(small, w, g, 2, 0.25, 0.0), [[2, 2, 2, 2]])
  # Each row then drops and grows to its own count; an ablated row empties.
  rows = lambda x: x.reshape(4, 8)
  new, grown = dynamic.drop_and_grow(rows(active), rows(magnitude), rows(grad),
                                     zeros.reshape(-1), 1)
  assert new.sum(-1).tolist() == [4, 4, 4, 0]
  assert grown[0, 5] and grown[1, 6] and grown[2, 7]


@pytest.mark.parametrize('seed', range(3))
def test_neuron_ablation_in_training_keeps_the_budget(seed):
  """A layer whose neuron 3 has tiny weights and no gradient loses it; after every update
  each neuron holds 0 or the layer's K' = B // (neurons kept) weights, ablated neurons'
  weights are 0, grown weights and their moments are 0; experts keep their own budgets."""
  k = jax.random.split(jax.random.key(seed), 2)
  params = {'w': jax.random.normal(k[0], (16, 8)).at[:, 3].multiply(1e-3),
            'e': jax.random.normal(k[1], (2, 16, 8))}
  tx = pruning.wrap(optax.adam(1e-2), sparsity=S, schedule='dynamic', start_step=START,
                    end_step=END, update_every=EVERY, fan_in='constant', drop_fraction=ALPHA,
                    min_salient=0.3, prunable=lambda path, leaf: True)
  state, update = tx.init(params), jax.jit(tx.update)
  budget = 8 * round((1 - S) * 16)                      # per layer: 8 neurons of K = 4
  ablated_w = False
  for step in range(END + 2):
    g = jax.tree.map(lambda x: jax.random.normal(jax.random.fold_in(k[0], step), x.shape),
                     params)
    g['w'] = g['w'].at[:, 3].set(0.0)
    updates, new_state = update(g, state, params)
    new_params = optax.apply_updates(params, updates)
    if step >= START:
      old_m, new_m = pruning.masks(state), pruning.masks(new_state)
      for name in params:
        m = np.asarray(new_m[name])
        per_neuron = m.sum(axis=-2).reshape(-1, 8)         # [layers, out]
        for counts in per_neuron:
          kept = counts[counts > 0]
          assert (kept == budget // kept.size).all(), (step, name, counts)
          assert budget - kept.size < kept.sum() <= budget
        w = np.asarray(new_params[name])
        assert (w[~m] == 0).all()
        grown = m & ~np.asarray(old_m[name])
        assert (w[grown] == 0).all()
        assert (np.asarray(new_state.inner[0].mu[name])[grown] == 0).all()
        assert (np.asarray(new_state.inner[0].nu[name])[grown] == 0).all()
      ablated_w |= bool(m[:, 3].sum() == 0)
    params, state = new_params, new_state
  assert ablated_w


def test_dynamic_sparsity_errors():
  p = {'w': jnp.ones((4, 2))}
  with pytest.raises(ValueError, match=r"schedule='dynamic' needs an int end_step"):
    pruning.wrap(optax.sgd(1.0), sparsity=0.5, schedule='dynamic')
  with pytest.raises(ValueError, match=r"regrow='best' is unknown"):
    pruning.wrap(optax.sgd(1.0), sparsity=0.5, schedule='dynamic', end_step=9, regrow='best')
  with pytest.raises(ValueError, match=r'drop_fraction=1.5 must be in \[0, 1\]'):
    pruning.wrap(optax.sgd(1.0), sparsity=0.5, schedule='dynamic', end_step=9,
                 drop_fraction=1.5)
  with pytest.raises(ValueError, match=r"needs scope='layer' and no n_m"):
    pruning.wrap(optax.sgd(1.0), sparsity=0.5, schedule='dynamic', end_step=9, n_m=(2, 4))
  with pytest.raises(ValueError, match=r"min_salient=0.3 ablates .* needs fan_in='constant'"):
    pruning.wrap(optax.sgd(1.0), sparsity=0.5, schedule='dynamic', end_step=9,
                 min_salient=0.3)
  with pytest.raises(ValueError, match=r'min_salient=2 must be in \[0, 1\]'):
    pruning.wrap(optax.sgd(1.0), sparsity=0.5, schedule='dynamic', end_step=9,
                 fan_in='constant', min_salient=2)
  tx = pruning.wrap(optax.sgd(1.0), sparsity=0.9, schedule='dynamic', end_step=9,
                    fan_in='constant', prunable=lambda path, leaf: True)
  with pytest.raises(ValueError, match=r"leaves leaf w \(4, 2\) no weight in a row of 4"):
    tx.init(p)


@pytest.mark.slow
@pytest.mark.parametrize('min_salient', [0.0, 0.3])
def test_dynamic_sparse_training_trains_a_moe_and_resumes_with_its_masks(
    tmp_path, data_dir, min_salient):
  """Through the trainer: experts included (per-expert budgets), constant fan-in (with
  and without neuron ablation), and a resume from the middle reproduces the straight
  run's trace and masks."""
  c = load_config('configs/tiny.py')
  c.data.data_dir = data_dir
  c.train.update(steps=12, checkpoint_every=6, eval_every=12, keep_checkpoints=2)
  c.pruning.update(sparsity=0.8, schedule='dynamic', start_step=0, end_step=10,
                   update_every=3, fan_in='constant', regrow='gradient',
                   min_salient=min_salient)
  straight, split = tmp_path / 'straight', tmp_path / 'split'
  assert loop.train(c, straight) == 0
  (split / 'checkpoints').mkdir(parents=True)
  shutil.copytree(straight / 'checkpoints' / '6', split / 'checkpoints' / '6')
  shutil.copy(straight / 'metrics.jsonl', split / 'metrics.jsonl')
  assert loop.train(c, split) == 0
  rows = lambda d: [json.loads(l) for l in (d / 'metrics.jsonl').read_text().splitlines()]
  assert [r['loss'] for r in rows(split)] == [r['loss'] for r in rows(straight)]
  last = rows(straight)[-2]
  pruned = [k for k in last if k.startswith('sparsity/')]
  assert any('experts' in k for k in pruned)
  assert all(abs(last[k] - 0.8) < 0.02 for k in pruned)   # round(0.8 * in) per neuron
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  model = checkpoint.load_model(straight, mesh)[2]
  wi = np.asarray(model.blocks[1].ffn.experts.wi[...])              # [E, D, F]
  budget = wi.shape[2] * (wi.shape[1] - round(0.8 * wi.shape[1]))   # per expert
  for counts in (wi != 0).sum(axis=1):                              # inputs per neuron
    live = counts[counts > 0]                # K' = budget // (neurons kept) <= this bound
    assert (live <= budget // live.size).all() and live.sum() <= budget
