"""Condensed constant fan-in layers: condensed_matmul computes the masked dense layer (to
1e-6 of the output scale, with its gradients), condense/expand are exact inverses, the
mask helper keeps the largest |w| per column, and the benchmark runs end to end (--quick).
"""
import importlib
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_jax.pruning.condensed import (CondensedLinear, condense, condensed_matmul,
                                          constant_fan_in_mask, expand)

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / 'experiments'
N_IN, N_OUT = 128, 48          # K = 26, 13, 6 at 80, 90, 95% sparsity


def _layer(sparsity, seed=0):
  """(w [in, out], its constant fan-in mask, values [K, out], indices [K, out])."""
  w = np.random.default_rng(seed).standard_normal((N_IN, N_OUT)).astype(np.float32)
  mask = np.asarray(constant_fan_in_mask(w, sparsity))
  return (w, mask, *condense(w, mask))


def _close(y, ref, rel=1e-6):
  """Max abs difference within rel of the output scale (max |ref|)."""
  y, ref = np.asarray(y), np.asarray(ref)
  assert y.shape == ref.shape and y.dtype == ref.dtype
  assert np.max(np.abs(y - ref)) <= rel * np.max(np.abs(ref))


@pytest.mark.parametrize('lead', [(), (3,), (2, 5)], ids=['in', 'B,in', 'B,L,in'])
@pytest.mark.parametrize('sparsity', [0.8, 0.9, 0.95])
def test_matches_masked_dense(sparsity, lead):
  w, mask, values, indices = _layer(sparsity)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((*lead, N_IN)), jnp.float32)
  ref = x @ jnp.asarray(w * mask)
  _close(condensed_matmul(x, values, indices), ref)
  _close(jax.jit(condensed_matmul)(x, values, indices), ref)


def test_gradients_match_masked_dense():
  """d/dx as the dense layer's; d/dvalues = the dense kernel's gradient at the kept entries."""
  w, mask, values, indices = _layer(0.9)
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, 5, N_IN)), jnp.float32)
  ct = jnp.asarray(rng.standard_normal((2, 5, N_OUT)), jnp.float32)
  dense = jax.grad(lambda x, w: jnp.sum((x @ w) * ct), argnums=(0, 1))
  cond = jax.jit(jax.grad(lambda x, v: jnp.sum(condensed_matmul(x, v, indices) * ct),
                          argnums=(0, 1)))
  gx_ref, gw_ref = dense(x, jnp.asarray(w * mask))
  gx, gv = cond(x, values)
  _close(gx, gx_ref)
  _close(gv, jnp.take_along_axis(gw_ref, indices, axis=0))


@pytest.mark.parametrize('sparsity', [0.0, 0.5, 0.9, 1.0])
def test_expand_inverts_condense(sparsity):
  """Also at the edges: K = in (all kept) and K = 0 (y = 0)."""
  w, mask, values, indices = _layer(sparsity)
  k = N_IN - round(sparsity * N_IN)
  assert values.shape == indices.shape == (k, N_OUT)
  assert values.dtype == jnp.float32 and indices.dtype == jnp.int32
  assert np.all(np.diff(np.asarray(indices), axis=0) > 0)          # ascending, distinct
  dense = expand(values, indices, N_IN)
  np.testing.assert_array_equal(dense, w * mask)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((3, N_IN)), jnp.float32)
  np.testing.assert_allclose(condensed_matmul(x, values, indices), x @ dense, rtol=0,
                             atol=1e-6 * max(1.0, float(jnp.max(jnp.abs(x @ dense)))))


def test_hand_computed_4x2():
  w = np.array([[1., 2.], [3., 4.], [5., 6.], [7., 8.]], np.float32)
  mask = np.array([[1, 0], [0, 1], [1, 1], [0, 0]], bool)
  values, indices = condense(w, mask)
  np.testing.assert_array_equal(indices, [[0, 1], [2, 2]])
  np.testing.assert_array_equal(values, [[1., 4.], [5., 6.]])
  x = jnp.array([1., 10., 100., 1000.])
  # y0 = 1 * 1 + 100 * 5; y1 = 10 * 4 + 100 * 6
  np.testing.assert_array_equal(condensed_matmul(x, values, indices), [501., 640.])
  np.testing.assert_array_equal(expand(values, indices, 4), w * mask)


def test_condense_refuses_non_constant_fan_in():
  w = np.ones((8, 3), np.float32)
  mask = np.zeros((8, 3), bool)
  mask[:3, 0] = mask[:7, 1] = mask[:5, 2] = True
  with pytest.raises(ValueError) as e:
    condense(w, mask)
  assert str(e.value) == ('mask has between 3 and 7 non-zeros per output column; condense '
                          "needs a constant fan-in (e.g. pruning with fan_in='constant'; "
                          'empty columns are fine)')


def test_an_ablated_neuron_condenses_to_zeros():
  """Neuron ablation leaves columns with no inputs: they get K zero values (and their
  output is 0); the other columns keep their K."""
  w = np.arange(1., 25.).reshape(8, 3).astype(np.float32)
  mask = np.zeros((8, 3), bool)
  mask[[1, 4, 6], 0] = mask[[0, 2, 7], 2] = True
  values, indices = condense(w, mask)
  assert values.shape == indices.shape == (3, 3)
  np.testing.assert_array_equal(values[:, 1], 0.0)
  np.testing.assert_array_equal(expand(values, indices, 8), w * mask)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8)), jnp.float32)
  np.testing.assert_allclose(condensed_matmul(x, values, indices), x @ (w * mask), atol=1e-5)


@pytest.mark.parametrize('w_shape, mask_shape', [((4, 2), (4, 3)), ((8,), (8,))])
def test_condense_refuses_a_shape_mismatch(w_shape, mask_shape):
  with pytest.raises(ValueError, match=r'^condense needs a kernel \[in, out\] and a mask of '
                                       r'the same shape; got kernel .* and mask .*$'):
    condense(np.ones(w_shape, np.float32), np.ones(mask_shape, bool))


def test_constant_fan_in_mask_keeps_the_largest_per_column():
  w = np.random.default_rng(0).standard_normal((50, 7)).astype(np.float32)
  mask = np.asarray(constant_fan_in_mask(w, 0.8))
  assert mask.dtype == bool and mask.shape == w.shape
  np.testing.assert_array_equal(mask.sum(axis=0), 10)
  a = np.abs(w)
  for o in range(w.shape[1]):
    assert a[mask[:, o], o].min() > a[~mask[:, o], o].max()
  # in - round(sparsity * in) kept: 205 of 2048 at 90%, as SRigL's layer of that size.
  assert np.asarray(constant_fan_in_mask(np.ones((2048, 2)), 0.9)).sum(axis=0).tolist() == [205] * 2


def test_constant_fan_in_mask_ties_go_by_index():
  """Among equal |w| the lower input row is pruned first (masking.prune_lowest's rule)."""
  w = np.array([[1., -2.], [-1., 2.], [1., 2.], [-1., -2.]], np.float32)
  np.testing.assert_array_equal(constant_fan_in_mask(w, 0.5),
                                [[0, 0], [0, 0], [1, 1], [1, 1]])
  with pytest.raises(ValueError, match='sparsity must be in'):
    constant_fan_in_mask(w, 1.5)


def test_condensed_linear_module():
  w, mask, values, indices = _layer(0.9)
  layer = CondensedLinear.from_dense(w, mask)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((3, N_IN)), jnp.float32)
  _close(layer(x), x @ jnp.asarray(w * mask))
  # Only the values are parameters: an optimizer over nnx.Param leaves the indices alone.
  params = nnx.state(layer, nnx.Param)
  assert list(params.keys()) == ['values']
  graphdef, state = nnx.split(layer)
  _close(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x), layer(x))


def test_bench_quick(tmp_path, capsys):
  sys.path.insert(0, str(EXPERIMENTS))
  bench = importlib.import_module('bench_condensed')
  path = tmp_path / 'bench.json'
  bench.main(['--quick', '--repeats', '2', '--json', str(path)])
  result = json.loads(path.read_text())
  meta, rows = result['meta'], result['rows']
  assert next(iter(result)) == 'meta'
  assert meta['command'].startswith('python ') and meta['git_rev'] and meta['jax']
  assert meta['seeds'] and 'corpus' not in meta
  assert {(r['sparsity'], r['batch']) for r in rows} == {
      (s, b) for s in (0.8, 0.9, 0.95) for b in (1, 8)}
  for r in rows:
    assert r['dense_ms'] > 0 and r['condensed_ms'] > 0
    assert r['speedup'] == pytest.approx(r['dense_ms'] / r['condensed_ms'])
    assert r['max_rel_diff'] <= 1e-6 and r['equal']
  md = path.with_suffix('.md').read_text()
  assert md.startswith('# Condensed') and '| 90% |' in md
  assert capsys.readouterr().out.startswith('# Condensed')
