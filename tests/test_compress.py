"""Compressing a trained model: expert scores, merging and compaction (the compacted model
equals the original with the removed experts' router logits at -inf), one-shot pruning of
a whole model, and `python -m sparse_jax.compress` end to end."""
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

import sparse_jax as sj
from sparse_jax import compress
from sparse_jax.config import load_config, model_spec, resolve
from sparse_jax.layers import ffn
from sparse_jax.models import TransformerLM
from sparse_jax.pruning import compaction, experts, post_training
from sparse_jax.training import checkpoint, loop

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ROOT / 'configs' / 'tiny.py'
KEPT = np.array([0, 2, 3, 5, 6, 7])


def _spec(num_experts=8, k=1, dispatch='index', cf=1.25, num_layers=2):
  c = load_config(TINY)
  c.mesh.data = 1
  c.model.num_layers = num_layers
  c.moe.update(num_experts=num_experts, k=k, dispatch=dispatch, capacity_factor=cf)
  return resolve(c, 1)


def _tokens(b=4, seed=0):
  return jax.random.randint(jax.random.key(seed), (b, 32), 0, 256)


@pytest.mark.parametrize('k,dispatch', [(1, 'index'), *(
    pytest.param(*c, marks=pytest.mark.slow) for c in [(2, 'index'), (2, 'dropless'),
                                                       (1, 'einsum')])])
def test_compacted_experts_equal_masked_experts(k, dispatch):
  spec = _spec(k=k, dispatch=dispatch, cf=1.0)
  model = TransformerLM(spec.model, rngs=nnx.Rngs(0))
  kept = {i: KEPT for i in model.moe_layers()}
  small_spec = _spec(num_experts=len(KEPT), k=k, dispatch=dispatch, cf=1.0 * len(KEPT) / 8)
  small = TransformerLM(small_spec.model, rngs=nnx.Rngs(1))
  nnx.update(small, compaction.compact_experts(nnx.state(model), kept))
  removed = ~np.isin(np.arange(8), KEPT)
  for layer in model.moe_layers().values():
    layer.router = experts.MaskedRouter(layer.router, removed)
  tokens = _tokens()
  want, aux_want = model(tokens)
  got, aux_got = small(tokens)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  for i in kept:
    assert aux_got['layers'][i]['dropped_fraction'] == aux_want['layers'][i]['dropped_fraction']
  assert small.blocks[1].ffn.experts.wi.shape[0] == len(KEPT)
  np.testing.assert_array_equal(small.blocks[1].ffn.router.kernel[...],
                                model.blocks[1].ffn.router.router.kernel[...][:, KEPT])


def test_compact_experts_refuses_unequal_counts():
  model = TransformerLM(_spec(num_experts=4, num_layers=4).model, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='same number of kept experts'):
    compaction.compact_experts(nnx.state(model), {1: [0, 1], 3: [0, 1, 2]})


def _routed(model, tokens, i):
  """(rows [N, D], kept expert ids [N, K], gate weights [N, K]) of MoE block i."""
  moe, h = experts.moe_inputs(model, tokens)[i]
  plan, _ = moe.route(h)
  rows = np.asarray(h).reshape(-1, h.shape[-1])
  expert = np.where(np.asarray(plan.kept), np.asarray(plan.expert), -1).reshape(len(rows), -1)
  return moe, rows, expert, np.asarray(plan.weight).reshape(len(rows), -1)


@pytest.mark.parametrize('k', [1, 2])
def test_expert_scores_by_token_loops(k):
  model = TransformerLM(_spec(k=k).model, rngs=nnx.Rngs(0))
  tokens = _tokens()
  moe, rows, expert, gate = _routed(model, tokens, 1)
  freq = experts.expert_scores(model, tokens, 'frequency')[1]
  reap = experts.expert_scores(model, tokens, 'reap')[1]
  w = moe.experts.weights()
  want_f, want_r = np.zeros(8), np.zeros(8)
  for e in range(8):
    outs = []
    for t in range(len(rows)):
      for j in range(k):
        if expert[t, j] == e:
          y = ffn({n: v[e] for n, v in w.items()}, rows[t:t + 1], 'gelu')
          outs.append(gate[t, j] * np.linalg.norm(np.asarray(y)))
    want_f[e], want_r[e] = len(outs), np.mean(outs) if outs else 0.0
  np.testing.assert_allclose(freq, want_f / want_f.sum())
  np.testing.assert_allclose(reap, want_r, rtol=1e-5)
  assert freq.sum() == pytest.approx(1.0)


@pytest.mark.parametrize('k', [1, 2])
def test_reconstruction_scores_by_token_loops(k):
  """Without expert e each token takes the top k of the softmax over the other experts
  (normalised for k = 2); capacity for all, so nothing drops."""
  model = TransformerLM(_spec(k=k, cf=8.0).model, rngs=nnx.Rngs(0))
  tokens = _tokens(b=2)
  got = experts.expert_scores(model, tokens, 'reconstruction')[1]
  moe, rows, _, _ = _routed(model, tokens, 1)
  w = {n: np.asarray(v, np.float64) for n, v in moe.experts.weights().items()}
  logits = rows.astype(np.float64) @ np.asarray(moe.router.kernel[...], np.float64)

  def layer(removed):
    out = np.zeros_like(rows, np.float64)
    for t in range(len(rows)):
      z = np.where(np.arange(8) == removed, -np.inf, logits[t])
      p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
      top = np.argsort(-p, kind='stable')[:k]
      gate = p[top] / p[top].sum() if k == 2 else p[top]
      for e, g in zip(top, gate):
        z = rows[t].astype(np.float64) @ w['wi'][e]          # jax.nn.gelu's tanh form
        h = 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3)))
        out[t] += g * h @ w['wo'][e]
    return out

  y = layer(None)
  want = [np.mean(np.sum((y - layer(e)) ** 2, -1)) / np.mean(np.sum(y ** 2, -1))
          for e in range(8)]
  np.testing.assert_allclose(got, want, rtol=1e-4)
  assert (got > 0).all() and moe.router.__class__.__name__ == 'Router'   # put back


@pytest.mark.slow
def test_expert_scores_on_an_expert_parallel_mesh_equal_one_device():
  """Calibration on a (data 2, expert 4) mesh scores as one device with the same routing
  groups (the tokens are split over both axes: 8 groups)."""
  c = load_config(TINY)
  c.moe.update(num_experts=8, k=2)
  tokens = _tokens(b=8)
  c.moe.group_size = tokens.size // 8
  ref = TransformerLM(model_spec(c), rngs=nnx.Rngs(0))
  c.moe.group_size = 0
  mesh = sj.sharding.make_mesh(data=2, expert=4, model=1)
  with jax.set_mesh(mesh):
    ep = TransformerLM(model_spec(c), mesh=mesh, rngs=nnx.Rngs(0))
  nnx.update(ep, jax.device_get(nnx.state(ref)))
  sj.sharding.put_params(ep, mesh)
  for score in experts.SCORES:
    want, got = experts.expert_scores(ref, tokens, score), experts.expert_scores(ep, tokens, score)
    assert got.keys() == want.keys() == {1}
    for i in want:
      np.testing.assert_allclose(got[i], want[i], rtol=1e-4, atol=1e-7, err_msg=score)


def test_choose_keeps_the_best_and_checks_keep():
  scores = {1: np.array([0.3, 0.1, 0.3, 0.2]), 3: np.array([0.0, 1.0, 2.0, 3.0])}
  kept = experts.choose(scores, 2, k=1)
  np.testing.assert_array_equal(kept[1], [0, 2])      # the tie at 0.3: both kept
  np.testing.assert_array_equal(kept[3], [2, 3])
  for keep in (0, 4):
    with pytest.raises(ValueError, match=f'keep={keep} must be at least k=1'):
      experts.choose(scores, keep, k=1)


def test_merging_averages_into_the_most_similar_kept_expert():
  model = TransformerLM(_spec(num_experts=4).model, rngs=nnx.Rngs(0))
  ex = model.blocks[1].ffn.experts
  base = {n: np.asarray(v) for n, v in ex.weights().items()}
  for name in base:                                  # expert 3 points like expert 1
    getattr(ex, name)[...] = getattr(ex, name)[...].at[3].set(2 * base[name][1])
  experts.merge_into_kept(model, {1: np.array([0, 1, 2])}, {1: np.array([1., 3., 1., 1.])})
  for name in base:
    got = np.asarray(getattr(ex, name)[...])
    np.testing.assert_allclose(got[1], 0.75 * base[name][1] + 0.25 * 2 * base[name][1],
                               rtol=1e-6)
    np.testing.assert_array_equal(got[[0, 2]], base[name][[0, 2]])


@pytest.mark.slow
@pytest.mark.parametrize('method', post_training.METHODS)
def test_prune_model_prunes_every_kernel_in_n_m(method):
  spec = _spec(num_experts=4, k=2)
  model = TransformerLM(spec.model, rngs=nnx.Rngs(0))
  masks = post_training.prune_model(model, _tokens(8), method=method, n_m=(2, 4))
  # attention q, k, v, o in two blocks; dense wi, wo; experts wi, wo
  assert len(masks) == 12
  w = np.asarray(model.blocks[1].ffn.experts.wo[...])            # [E, F, D]
  groups = (w.reshape(w.shape[0], -1, 4, w.shape[-1]) != 0).sum(axis=2)
  assert (groups <= 2).all()


# --- end to end -----------------------------------------------------------------------

@pytest.fixture(scope='module')
def trained(tmp_path_factory, data_dir):
  c = load_config(TINY)
  c.data.data_dir = data_dir
  c.train.update(steps=4, checkpoint_every=4, eval_every=4)
  workdir = tmp_path_factory.mktemp('src')
  assert loop.train(c, workdir) == 0
  return workdir, data_dir


def _snapshot(d):
  return sorted((p.relative_to(d).as_posix(), p.stat().st_mtime_ns, p.stat().st_size)
                for p in pathlib.Path(d).rglob('*'))


@pytest.mark.slow
def test_compress_one_shot_then_continue_training(trained, tmp_path):
  src, data_dir = trained
  before = _snapshot(src)
  r = compress.compress(compress.Options(workdir=str(src), out=str(tmp_path / 'dst'),
                                         method='sparsegpt', sparsity=0.5))
  assert _snapshot(src) == before                                 # the source is untouched
  assert r['step'] == 4 and r['after']['params'][1] < r['before']['params'][1]
  c = load_config(tmp_path / 'dst' / 'config.py')
  c.train.steps = 7
  assert loop.train(c, tmp_path / 'dst') == 0                     # a recovery fine-tune
  _, _, model = checkpoint.load_model(tmp_path / 'dst', loop.make_mesh(resolve(c, 8)))
  wi = np.asarray(model.blocks[0].ffn.wi[...])
  assert (wi == 0).sum(axis=0).tolist() == [16] * wi.shape[1]    # its masks held


@pytest.mark.slow
def test_compress_experts_then_continue_training(trained, tmp_path):
  src, _ = trained
  r = compress.compress(compress.Options(workdir=str(src), out=str(tmp_path / 'dst'),
                                         method='experts', keep=2, score='reap', merge=True))
  assert [len(v) for v in r['kept'].values()] == [2]
  c = load_config(tmp_path / 'dst' / 'config.py')
  assert c.moe.num_experts == 2 and c.moe.capacity_factor == pytest.approx(1.25 * 2 / 4)
  c.train.steps = 6
  assert loop.train(c, tmp_path / 'dst') == 0


def _cli(*args):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  return subprocess.run([sys.executable, '-m', 'sparse_jax.compress', *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_compress_command(trained, tmp_path):
  src, _ = trained
  r = _cli(f'--workdir={src}', f'--out={tmp_path / "dst"}', '--method=wanda', '--n_m=2:4',
           '--calibration_batches=1', '--cpu_devices=8')
  assert r.returncode == 0, r.stderr
  assert 'before' in r.stdout and 'after' in r.stdout and 'config.py' in r.stdout
  record = json.loads((tmp_path / 'dst' / 'compress.json').read_text())
  assert record['after']['params'][1] < record['before']['params'][1]


@pytest.mark.parametrize('flags,words', [
    (['--method=wanda', '--sparsity=1.5'], '--sparsity=1.5 must be in [0, 1)'),
    (['--method=wanda', '--n_m=4:2'], '--n_m=4:2 needs 0 < N < M'),
    (['--method=wanda'], 'exactly one of --sparsity=S and --n_m=N:M'),
    (['--method=sparsegpt', '--sparsity=0.5', '--calibration_batches=0'],
     '--calibration_batches=0 must be >= 1'),
])
def test_compress_mistakes_exit_2_with_one_line(tmp_path, flags, words):
  (tmp_path / 'src').mkdir()                # refused before the source is even read
  r = _cli(f'--workdir={tmp_path / "src"}', f'--out={tmp_path / "dst"}', *flags)
  assert r.returncode == 2 and r.stderr.count('\n') == 1 and words in r.stderr, r.stderr
  assert not (tmp_path / 'dst').exists()


@pytest.mark.slow
def test_compress_keep_out_of_range_exits_2(trained, tmp_path):
  src, _ = trained
  r = _cli(f'--workdir={src}', f'--out={tmp_path / "dst"}', '--method=experts', '--keep=9',
           '--cpu_devices=8')
  assert r.returncode == 2 and r.stderr.count('\n') == 1, r.stderr
  assert '--keep=9 must be at least k=1' in r.stderr
  assert not (tmp_path / 'dst').exists()


def test_compress_needs_a_checkpoint(tmp_path):
  (tmp_path / 'src').mkdir()
  r = _cli(f'--workdir={tmp_path / "src"}', f'--out={tmp_path / "dst"}', '--method=wanda',
           '--sparsity=0.5')
  assert r.returncode == 2 and 'has no checkpoints/' in r.stderr
