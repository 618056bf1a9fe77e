"""Faults in compression and pruning: compress reads every workdir the project writes
(compressed outputs, runs trained with a pruner, upcycled runs) and writes its output
atomically; compaction refuses bad kept indices; pruning refuses non-finite weights and
calibration inputs, naming the leaf. Each test causes the fault."""
import os
import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sparse_jax as sj
from sparse_jax import compress
from sparse_jax.config import load_config, resolve
from sparse_jax.models import TransformerLM
from sparse_jax.pruning import compaction, experts, post_training, structured
from sparse_jax.training import checkpoint, loop

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ROOT / 'configs' / 'tiny.py'


def _cli(*args):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  return subprocess.run([sys.executable, '-m', 'sparse_jax.compress', *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=300)


def _train(data_dir, workdir, **pruning):
  c = load_config(TINY)
  c.data.data_dir = data_dir
  c.train.update(steps=6, checkpoint_every=6, eval_every=6)
  c.pruning.update(**pruning)
  assert loop.train(c, workdir) == 0
  return workdir


def _zeros(workdir, mesh):
  _, _, model = checkpoint.load_model(workdir, mesh)
  return np.asarray(model.blocks[0].attn.wq[...]) == 0


# --- compress reads what the project writes ---------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize('pruning', [
    dict(sparsity=0.5, schedule='gmp', start_step=0, end_step=4, update_every=2),
    dict(sparsity=0.5, schedule='dynamic', start_step=0, end_step=4, update_every=2),
    dict(n_m='2:4', schedule='one_shot'),
], ids=['gmp', 'dynamic', 'n_m'])
def test_compress_reads_a_run_trained_with_a_pruner(data_dir, tmp_path, pruning):
  """Experts removed from a run that trained with a pruner, then one-shot on top of that
  output (compress twice): both continue training, and the earlier zeros stay zero."""
  src = _train(data_dir, tmp_path / 'src', **pruning)
  mesh = loop.make_mesh(resolve(load_config(TINY), jax.device_count()))
  had = _zeros(src, mesh)
  compress.compress(compress.Options(workdir=str(src), out=str(tmp_path / 'e'),
                                     method='experts', keep=2))
  compress.compress(compress.Options(workdir=str(tmp_path / 'e'), out=str(tmp_path / 'w'),
                                     method='wanda', sparsity=0.25))
  now = _zeros(tmp_path / 'w', mesh)
  assert (now | ~had).all()                           # what the source pruned stays pruned
  c = load_config(tmp_path / 'w' / 'config.py')
  c.train.steps = 8
  assert loop.train(c, tmp_path / 'w') == 0
  assert (_zeros(tmp_path / 'w', mesh) | ~had).all()


@pytest.mark.slow
def test_compress_reads_an_upcycled_run(data_dir, tmp_path):
  dense = load_config(TINY)
  dense.data.data_dir = data_dir
  dense.moe.num_experts = 0
  dense.train.update(steps=2, checkpoint_every=2, eval_every=2)
  assert loop.train(dense, tmp_path / 'dense') == 0
  up = load_config(TINY)
  up.data.data_dir = data_dir
  up.init.upcycle_from = str(tmp_path / 'dense')
  up.train.update(steps=4, checkpoint_every=4, eval_every=4)
  assert loop.train(up, tmp_path / 'up') == 0
  r = compress.compress(compress.Options(workdir=str(tmp_path / 'up'),
                                         out=str(tmp_path / 'dst'), method='magnitude',
                                         sparsity=0.5))
  assert r['after']['params'][1] < r['before']['params'][1]


def test_transplant_copies_a_pruner_into_a_pruner():
  """Pruner to pruner the state is copied by path (it used to be remapped into `inner`)."""
  spec = resolve(load_config(TINY), 1)
  model = TransformerLM(spec.model, rngs=nnx.Rngs(0))
  tx = sj.pruning.wrap(optax.adam(1e-3), sparsity=0.5, schedule='one_shot')
  src = nnx.state((model, nnx.Optimizer(model, tx, wrt=nnx.Param)))
  tmpl = nnx.state((TransformerLM(spec.model, rngs=nnx.Rngs(1)),
                    nnx.Optimizer(model, tx, wrt=nnx.Param)))
  out = compress.transplant(tmpl, src, {}, 7)
  got = dict(nnx.to_flat_state(out))
  for path, v in nnx.to_flat_state(src):
    np.testing.assert_array_equal(np.asarray(got[path][...]), np.asarray(v[...]))


# --- compress output ---------------------------------------------------------------------

def test_compress_out_that_is_a_file_exits_2_in_one_line(tmp_path):
  (tmp_path / 'src').mkdir()
  (tmp_path / 'afile').write_text('')
  r = _cli(f'--workdir={tmp_path / "src"}', f'--out={tmp_path / "afile"}', '--method=wanda',
           '--sparsity=0.5')
  assert r.returncode == 2 and r.stderr.count('\n') == 1, r.stderr
  assert f'--out={tmp_path / "afile"} is a file; give a new directory' in r.stderr


@pytest.mark.slow
def test_an_interrupted_compress_leaves_no_output_and_the_rerun_completes(data_dir, tmp_path):
  src = _train(data_dir, tmp_path / 'src')
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  args = [sys.executable, '-m', 'sparse_jax.compress', f'--workdir={src}',
          f'--out={tmp_path / "dst"}', '--method=magnitude', '--sparsity=0.5',
          '--cpu_devices=8']
  p = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  work = tmp_path / '.dst.incomplete'
  deadline = time.time() + 240
  while not (work / 'checkpoints').exists() and p.poll() is None:   # killed mid-write
    assert time.time() < deadline
    time.sleep(0.02)
  p.kill()
  p.wait()
  assert not (tmp_path / 'dst').exists()             # nothing that looks complete
  r = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr
  assert not work.exists() and {'config.py', 'config.json', 'compress.json'} <= {
      p.name for p in (tmp_path / 'dst').iterdir()}


@pytest.mark.slow
def test_compress_of_an_expert_parallel_run_names_cpu_devices(data_dir, tmp_path):
  c = load_config(TINY)
  c.data.data_dir = data_dir
  c.mesh.update(data=2, expert=4)
  c.train.update(steps=2, checkpoint_every=2, eval_every=2)
  assert loop.train(c, tmp_path / 'src') == 0
  r = _cli(f'--workdir={tmp_path / "src"}', f'--out={tmp_path / "dst"}', '--method=magnitude',
           '--sparsity=0.5', '--cpu_devices=1')
  assert r.returncode == 2 and r.stderr.count('\n') == 1, r.stderr
  assert 'rerun with --cpu_devices=8' in r.stderr and '--config.mesh' not in r.stderr
  assert not (tmp_path / 'dst').exists()


# --- compaction and structured pruning refuse bad kept indices ---------------------------

def _dense():
  c = load_config(TINY)
  c.moe.num_experts = 0
  spec = resolve(c, 1).model
  return spec, nnx.state(TransformerLM(spec, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize('kept,words', [
    ([0, 999], 'index 999 is outside [0, 64)'),
    ([3, 3], 'index 3 is listed more than once'),
    ([], 'is empty: a block needs at least one of its 64 FFN neurons'),
    ([0.5, 1.0], 'integer indices'),
    ([-1, 2], 'index -1 is outside [0, 64)'),
])
def test_compact_refuses_bad_kept_indices(kept, words):
  spec, state = _dense()
  with pytest.raises(ValueError, match='blocks/0/ffn') as e:
    compaction.compact(spec, state, {('blocks', i, 'ffn'): kept for i in range(2)})
  assert words in str(e.value)


def test_compact_experts_refuses_bad_kept_indices():
  spec = resolve(load_config(TINY), 1).model
  state = nnx.state(TransformerLM(spec, rngs=nnx.Rngs(0)))
  moe_block = next(i for i in range(spec.num_layers) if spec.is_moe_block(i))
  with pytest.raises(ValueError, match=r'index 4 is outside \[0, 4\)'):
    compaction.compact_experts(state, {moe_block: [0, 4]})
  with pytest.raises(ValueError, match='listed more than once'):
    compaction.compact_experts(state, {moe_block: [1, 1]})


@pytest.mark.parametrize('kind,num_heads,words', [
    ('heads', 2, 'prunes all 2 heads of blocks/0/attn; keep at least one: use sparsity '
                 'below 0.75'),
    ('ffn_neurons', None, 'prunes all 64 ffn_neurons of blocks/0/ffn')])
def test_structured_pruning_that_would_empty_a_block_is_refused(kind, num_heads, words):
  _, state = _dense()
  with pytest.raises(ValueError) as e:
    structured.structured_masks(state, 0.999, kind, num_heads=num_heads)
  assert words in str(e.value)


# --- non-finite weights and calibration inputs -------------------------------------------

def _nan_at(w, i=3):
  return w.at[i, 0].set(jnp.nan)


@pytest.mark.parametrize('method', ['magnitude', 'wanda', 'sparsegpt'])
def test_one_shot_refuses_non_finite_inputs(method):
  w = jax.random.normal(jax.random.key(0), (16, 8))
  x = jax.random.normal(jax.random.key(1), (32, 16))
  fn = getattr(sj.pruning, method)
  with pytest.raises(ValueError, match=r'weights hold 1 non-finite value'):
    fn(_nan_at(w), x, sparsity=0.5)
  if method != 'magnitude':
    with pytest.raises(ValueError, match=r'calibration inputs hold 1 non-finite value'):
      fn(w, _nan_at(x), sparsity=0.5)
  fn(w, x, sparsity=0.5)                                  # finite: fine


def test_prune_model_names_the_leaf_with_non_finite_weights():
  spec = resolve(load_config(TINY), 1).model
  model = TransformerLM(spec, rngs=nnx.Rngs(0))
  model.blocks[1].attn.wv[...] = _nan_at(model.blocks[1].attn.wv[...])
  tokens = jax.random.randint(jax.random.key(0), (2, 32), 0, 256)
  with pytest.raises(ValueError, match=r'^blocks/1/attn/wv: weights hold 1 non-finite'):
    post_training.prune_model(model, tokens, method='wanda', sparsity=0.5)


def test_expert_scores_refuse_non_finite_expert_weights():
  spec = resolve(load_config(TINY), 1).model
  model = TransformerLM(spec, rngs=nnx.Rngs(0))
  i, moe = next(iter(model.moe_layers().items()))
  moe.experts.wi[...] = moe.experts.wi[...].at[0, 0, 0].set(jnp.inf)
  tokens = jax.random.randint(jax.random.key(0), (2, 32), 0, 256)
  with pytest.raises(ValueError, match=rf'blocks/{i}/ffn: expert weights wi hold 1 non-finite'):
    experts.expert_scores(model, tokens, 'frequency')


@pytest.mark.parametrize('method', ['magnitude', 'saliency'])
def test_the_pruning_wrapper_refuses_a_nan_weight_eagerly(method):
  params = {'ffn': {'wi': _nan_at(jnp.ones((8, 8)))}}
  tx = sj.pruning.wrap(optax.sgd(0.1), sparsity=0.5, method=method, schedule='one_shot')
  state = tx.init(params)
  with pytest.raises(ValueError, match=r'ffn/wi: weights hold 1 non-finite'):
    tx.update(jax.tree.map(jnp.ones_like, params), state, params)
