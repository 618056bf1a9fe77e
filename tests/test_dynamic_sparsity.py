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
  tx = pruning.wrap(optax.sgd(1.0), sparsity=0.9, schedule='dynamic', end_step=9,
                    fan_in='constant', prunable=lambda path, leaf: True)
  with pytest.raises(ValueError, match=r"leaves leaf w \(4, 2\) no weight in a row of 4"):
    tx.init(p)


@pytest.mark.slow
def test_dynamic_sparse_training_trains_a_moe_and_resumes_with_its_masks(tmp_path, data_dir):
  """Through the trainer: experts included (per-expert budgets), constant fan-in, and a
  resume from the middle reproduces the straight run's trace and masks."""
  c = load_config('configs/tiny.py')
  c.data.data_dir = data_dir
  c.train.update(steps=12, checkpoint_every=6, eval_every=12, keep_checkpoints=2)
  c.pruning.update(sparsity=0.8, schedule='dynamic', start_step=0, end_step=10,
                   update_every=3, fan_in='constant', regrow='gradient')
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
  assert ((wi != 0).sum(axis=1) <= wi.shape[1] - round(0.8 * wi.shape[1])).all()
