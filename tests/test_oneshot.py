"""sparse_jax.pruning.oneshot: SparseGPT against a literal NumPy Algorithm 1, Wanda against a
NumPy reference and by hand, N:M groups, exact counts, reconstruction error, bad input.

Shape legend: w [in, out] (y = x @ w), x [N, in]; the references work in the papers' W
[out, in] and transpose at the boundary.
"""
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_jax.pruning import oneshot

METHODS = {'magnitude': oneshot.magnitude, 'wanda': oneshot.wanda,
           'sparsegpt': oneshot.sparsegpt}


def _data(seed=0, d_in=16, d_out=8, n=64, dead=None, anisotropic=False):
  """Random w [in, out] and correlated x = z @ A [N, in] (H not diagonal); optionally one
  dead input feature (a zero column of x).

  anisotropic: A's rows scaled from 1 down to 0.05, a decaying spectrum like real
  activations (the regime SparseGPT's reconstruction is built for); otherwise A = I + noise
  (mildly correlated, well conditioned).
  """
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(d_in, d_out))
  if anisotropic:
    a = rng.normal(size=(d_in, d_in)) * np.geomspace(1, 0.05, d_in)[:, None]
  else:
    a = np.eye(d_in) + rng.normal(size=(d_in, d_in)) / math.sqrt(d_in)
  x = rng.normal(size=(n, d_in)) @ a
  if dead is not None:
    x[:, dead] = 0
  return w.astype(np.float32), x.astype(np.float32)


def _zeros_per_column(w):
  return np.sum(np.asarray(w) == 0, axis=0)


# ---- NumPy references (float64, explicit loops) ---------------------------------------

def _sparsegpt_ref(w, x, sparsity=None, n_m=None, block_size=128, damp=0.01):
  """SparseGPT, Algorithm 1 of Frantar & Alistarh 2023, loop by loop, in W [out, in].

  Mask choice as documented in oneshot.sparsegpt: unstructured = per row of W at block
  start with quota round(s * end) - round(s * start); N:M = the M - N lowest at every
  M-aligned column from the current W. Ties: lower index pruned first (stable sort).
  """
  W = np.array(w, np.float64).T.copy()                                 # [out, in]
  X = np.asarray(x, np.float64)                                        # [N, in]
  d_row, d_col = W.shape
  H = X.T @ X
  for i in range(d_col):
    if H[i, i] == 0:                                                   # dead input
      H[i, i] = 1
      W[:, i] = 0
  H += damp * np.mean(np.diag(H)) * np.eye(d_col)
  Hinv = np.linalg.cholesky(np.linalg.inv(H)).T                        # upper: U^T U = H^-1
  M = np.ones((d_row, d_col), bool)
  if n_m is None:
    B = Bs = block_size
  else:
    n, m = n_m
    B, Bs = math.ceil(block_size / m) * m, m
  for i in range(0, d_col, B):
    end = min(i + B, d_col)
    E = np.zeros((d_row, end - i))
    for j in range(i, end):
      if (j - i) % Bs == 0:
        cols = list(range(j, min(j + Bs, end)))
        if n_m is None:
          n_prune = round(sparsity * end) - round(sparsity * i)
        else:
          n_prune = m - n
        for r in range(d_row):
          sal = [W[r, c] ** 2 / Hinv[c, c] ** 2 for c in cols]
          for k in np.argsort(sal, kind='stable')[:n_prune]:
            M[r, cols[k]] = False
      E[:, j - i] = W[:, j] / Hinv[j, j]
      E[:, j - i] = (1 - M[:, j]) * E[:, j - i]
      W[:, j:end] -= np.outer(E[:, j - i], Hinv[j, j:end])
    W[:, end:] -= E @ Hinv[i:end, end:]
  W = W * M
  return W.T, M.T


def _wanda_ref(w, x, sparsity=None, n_m=None):
  """Wanda in W [out, in]: score |W_ij| * ||X_j||, per-row sort (stable)."""
  W = np.array(w, np.float64).T
  norm = np.sqrt(np.sum(np.asarray(x, np.float64) ** 2, axis=0))
  score = np.abs(W) * norm[None, :]
  M = np.ones_like(W, bool)
  for r in range(W.shape[0]):
    if n_m is None:
      M[r, np.argsort(score[r], kind='stable')[:round(sparsity * W.shape[1])]] = False
    else:
      n, m = n_m
      for g in range(0, W.shape[1], m):
        M[r, g + np.argsort(score[r, g:g + m], kind='stable')[:m - n]] = False
  return (W * M).T, M.T


# ---- SparseGPT --------------------------------------------------------------------------

@pytest.mark.parametrize('dead', [None, 5])
@pytest.mark.parametrize('block_size', [6, 16, 40])                    # <, =, > in (16)
@pytest.mark.parametrize('spec', [{'sparsity': 0.5}, {'n_m': (2, 4)}], ids=['50%', '2:4'])
def test_sparsegpt_matches_numpy_algorithm_1(spec, block_size, dead):
  w, x = _data(dead=dead)
  wp, mask = oneshot.sparsegpt(w, x, block_size=block_size, **spec)
  ref_w, ref_mask = _sparsegpt_ref(w, x, block_size=block_size, **spec)
  np.testing.assert_array_equal(np.asarray(mask), ref_mask)
  np.testing.assert_allclose(np.asarray(wp), ref_w, atol=1e-5)
  assert np.all(np.asarray(wp)[~np.asarray(mask)] == 0)                 # exactly 0
  if dead is not None:
    assert np.all(np.asarray(wp)[dead] == 0)


def test_sparsegpt_float64_matches_reference_tightly():
  w, x = _data(seed=1, dead=3)
  ref_w, _ = _sparsegpt_ref(w, x, sparsity=0.5, block_size=5)
  with jax.enable_x64(True):
    wp, _ = oneshot.sparsegpt(w.astype(np.float64), x.astype(np.float64), sparsity=0.5,
                              block_size=5)
    assert wp.dtype == jnp.float64
  np.testing.assert_allclose(np.asarray(wp), ref_w, atol=1e-10)


def test_sparsegpt_n_m_does_not_depend_on_block_size():
  # Lazy batch updates are exact and N:M groups see fully updated rows, so only rounding
  # differs; block_size 1, 3 and 6 are rounded up to multiples of M = 4, and 12 leaves a
  # partial last block (in = 16).
  w, x = _data(seed=2)
  base, base_mask = oneshot.sparsegpt(w, x, n_m=(2, 4), block_size=16)
  for bs in (1, 3, 6, 12):
    wp, mask = oneshot.sparsegpt(w, x, n_m=(2, 4), block_size=bs)
    np.testing.assert_array_equal(np.asarray(mask), np.asarray(base_mask))
    np.testing.assert_allclose(np.asarray(wp), np.asarray(base), atol=1e-5)


@pytest.mark.parametrize('spec', [{'sparsity': 0.5}, {'sparsity': 0.7}, {'n_m': (2, 4)}],
                         ids=['50%', '70%', '2:4'])
def test_sparsegpt_reconstructs_better_than_wanda_and_magnitude(spec):
  w, x = _data(seed=3, d_in=32, d_out=16, n=256, anisotropic=True)
  err = {name: float(np.linalg.norm(x @ w - x @ np.asarray(f(w, x, **spec)[0])))
         for name, f in METHODS.items()}
  assert err['sparsegpt'] < err['wanda'] and err['sparsegpt'] < err['magnitude'], err
  wp, _ = oneshot.sparsegpt(w, x, **spec)
  k = 16 if 'n_m' in spec else round(spec['sparsity'] * 32)
  np.testing.assert_array_equal(_zeros_per_column(wp), k)


def test_sparsegpt_unstructured_per_block_quotas():
  # in = 16, blocks of 6: round(.5*6) - 0, round(.5*12) - 3, round(.5*16) - 6 = 3, 3, 2.
  w, x = _data(seed=4)
  _, mask = oneshot.sparsegpt(w, x, sparsity=0.5, block_size=6)
  pruned = ~np.asarray(mask)
  for (a, b), k in zip([(0, 6), (6, 12), (12, 16)], [3, 3, 2]):
    np.testing.assert_array_equal(pruned[a:b].sum(0), k)


def test_sparsity_zero_keeps_everything():
  w, x = _data(seed=5)
  for f in METHODS.values():
    wp, mask = f(w, x, sparsity=0.0)
    assert np.asarray(mask).all()
    np.testing.assert_allclose(np.asarray(wp), w, atol=1e-6)


def test_jit_matches_eager():
  # The public functions validate statically and trace: they nest inside a user's jit.
  w, x = _data(seed=6)
  specs = [{'sparsity': 0.5}, {'n_m': (2, 4)}, {'sparsity': 0.5}]
  for (name, f), spec in zip(METHODS.items(), specs):
    jitted = jax.jit(partial(f, **spec))(jnp.asarray(w), jnp.asarray(x))
    eager = f(w, x, **spec)
    np.testing.assert_array_equal(np.asarray(jitted[1]), np.asarray(eager[1]), name)
    np.testing.assert_allclose(np.asarray(jitted[0]), np.asarray(eager[0]), atol=1e-6)


# ---- Wanda and magnitude ----------------------------------------------------------------

@pytest.mark.parametrize('spec', [{'sparsity': 0.5}, {'sparsity': 0.3}, {'n_m': (2, 4)}],
                         ids=['50%', '30%', '2:4'])
def test_wanda_matches_numpy_reference_and_differs_from_magnitude(spec):
  w, x = _data(seed=7)
  x = x * np.geomspace(0.1, 10, x.shape[1], dtype=np.float32)          # varied input norms
  wp, mask = oneshot.wanda(w, x, **spec)
  ref_w, ref_mask = _wanda_ref(w, x, **spec)
  np.testing.assert_array_equal(np.asarray(mask), ref_mask)
  np.testing.assert_array_equal(np.asarray(wp), ref_w.astype(np.float32))
  _, mag_mask = oneshot.magnitude(w, **spec)
  assert not np.array_equal(np.asarray(mask), np.asarray(mag_mask))


def test_wanda_with_equal_input_norms_is_per_column_magnitude():
  w, x = _data(seed=8)
  x = x / np.linalg.norm(x, axis=0)                                    # every norm = 1
  _, mask = oneshot.wanda(w, x, sparsity=0.5)
  keep = np.ones_like(w, bool)
  for c in range(w.shape[1]):
    keep[np.argsort(np.abs(w[:, c]), kind='stable')[:8], c] = False
  np.testing.assert_array_equal(np.asarray(mask), keep)


def test_wanda_by_hand():
  w = np.array([[1, -2], [4, 1], [-3, 0.5], [1, 1]], np.float32)       # [in=4, out=2]
  x = np.array([[3, 0, 1, 0], [4, 1, 0, 2]], np.float32)               # norms [5, 1, 1, 2]
  # scores: column 0 = [5, 4, 3, 2], column 1 = [10, 1, 0.5, 2]
  half = [[True, True], [True, False], [False, False], [False, True]]
  for spec in ({'sparsity': 0.5}, {'n_m': (2, 4)}):
    wp, mask = oneshot.wanda(w, x, **spec)
    np.testing.assert_array_equal(np.asarray(mask), half)
    np.testing.assert_array_equal(np.asarray(wp), w * np.asarray(half))
  # 1:2 groups (rows 0-1, rows 2-3): column 0 keeps 0 and 2, column 1 keeps 0 and 3.
  _, mask = oneshot.wanda(w, x, n_m=(1, 2))
  np.testing.assert_array_equal(np.asarray(mask),
                                [[True, True], [False, False], [True, False], [False, True]])
  # Magnitude per column would prune rows 0 and 3 of column 0 (|1| and |1|): different.
  _, mask = oneshot.magnitude(w, sparsity=0.5)
  assert not np.array_equal(np.asarray(mask), half)


def test_magnitude_is_layer_wise_with_deterministic_ties():
  w, _ = _data(seed=9)
  _, mask = oneshot.magnitude(w, sparsity=0.5)
  assert np.sum(~np.asarray(mask)) == w.size // 2
  assert len(set(_zeros_per_column(w * np.asarray(mask)))) > 1        # not per column
  assert np.abs(w)[~np.asarray(mask)].max() <= np.abs(w)[np.asarray(mask)].min()
  ones = np.ones((4, 2), np.float32)                                   # all tied
  _, mask = oneshot.magnitude(ones, sparsity=0.5)                      # lower flat index first
  np.testing.assert_array_equal(np.asarray(mask), [[False, False], [False, False],
                                                   [True, True], [True, True]])


# ---- N:M ----------------------------------------------------------------------------------

@pytest.mark.parametrize('n_m', [(2, 4), (1, 4), (3, 8)])
@pytest.mark.parametrize('method', list(METHODS))
def test_n_m_groups_hold_exactly_n(method, n_m):
  w, x = _data(seed=10)
  wp, mask = METHODS[method](w, x, n_m=n_m)
  n, m = n_m
  groups = np.asarray(wp).reshape(16 // m, m, -1)                      # [in / M, M, out]
  np.testing.assert_array_equal(np.sum(groups != 0, axis=1), n)        # no weight of w is 0
  np.testing.assert_array_equal(np.asarray(mask).reshape(16 // m, m, -1).sum(1), n)


# ---- bad input ------------------------------------------------------------------------

@pytest.mark.parametrize('kwargs, match', [
    ({'sparsity': 1.0}, r'sparsity=1.0 is outside \[0, 1\)'),
    ({'sparsity': -0.1}, r'sparsity=-0.1 is outside'),
    ({}, r'give exactly one'),
    ({'sparsity': 0.5, 'n_m': (2, 4)}, r'give exactly one'),
    ({'n_m': (4, 4)}, r'n_m=\(4, 4\) needs 1 <= N < M'),
    ({'n_m': (0, 4)}, r'n_m=\(0, 4\) needs 1 <= N < M'),
    ({'n_m': (2, 5)}, r'not divisible by M=5'),
    ({'n_m': 4}, r'n_m=4 is not a pair'),
    ({'sparsity': 0.5, 'x': np.ones((8, 15))}, r'x has shape \(8, 15\).*\[N, 16\]'),
    ({'sparsity': 0.5, 'block_size': 0}, r'block_size=0; pass a positive int'),
    ({'sparsity': 0.5, 'damp': -0.01}, r'damp=-0.01 is negative'),
])
def test_bad_input_raises_one_line(kwargs, match):
  w, x = _data()
  kwargs = dict(kwargs)
  x = kwargs.pop('x', x)
  fns = ([oneshot.sparsegpt] if {'block_size', 'damp'} & set(kwargs)
         else list(METHODS.values()))
  for f in fns:
    with pytest.raises(ValueError, match=match) as info:
      f(w, x, **kwargs)
    assert '\n' not in str(info.value)
