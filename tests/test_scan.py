"""Scanned layers (model.scan_layers): the stacked model is the unrolled one.

Built from one seed, the two layouts hold the same numbers and compute the same logits,
gradients and training trace (on one device and on an expert-parallel mesh with FSDP,
micro-batches and remat); a checkpoint of either resumes in the other; pruning keeps
per-layer budgets; generation, the hub, accounting and upcycling see the same model.
"""
import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, traverse_util

from sparse_jax import hub, inference, pruning, roles, sharding
from sparse_jax.analysis import accounting
from sparse_jax.config import load_config, model_spec, resolve
from sparse_jax.hub import safetensors as st
from sparse_jax.models import TransformerLM, layout, relayout
from sparse_jax.pruning import compaction, post_training
from sparse_jax.training import checkpoint, loop, steps as steps_lib
from sparse_jax.upcycle import upcycle

ROOT = pathlib.Path(__file__).resolve().parents[1]
HF = ROOT / 'tests' / 'hf'


@pytest.mark.parametrize('kinds, want', [
    ('DMDMDM', (0, 2, 3)), ('DMMMMM', (1, 1, 5)), ('DDDD', (0, 1, 4)),
    ('DMDMD', (1, 2, 2)), ('MDDMDD', (0, 3, 2)), ('D', (0, 1, 1)), ('MD', (0, 2, 1))])
def test_pattern_by_hand(kinds, want):
  pat = layout.pattern(kinds)
  assert (pat.prefix, pat.period, pat.repeats) == want
  assert [kinds[pat.index(*pat.position(i))] for i in range(pat.prefix, len(kinds))] == list(
      kinds[pat.prefix:])


def test_paths_move_both_ways_by_hand():
  pat = layout.Pattern(prefix=1, period=2, repeats=2)           # blocks 0 | 1 2 | 3 4
  flat = {('blocks', i, 'w'): np.full((3,), i) for i in range(5)}
  flat[('embed',)] = np.zeros(2)
  flat[('opt', 'mu', 'blocks', 3, 'w')] = np.full((3,), 30)     # optimizer paths too
  flat[('opt', 'mu', 'blocks', 1, 'w')] = np.full((3,), 10)
  scanned = layout.to_scanned(flat, pat, np.stack)
  assert sorted(map(str, scanned)) == sorted(map(str, [
      ('blocks', 0, 'w'), ('stack', 0, 'w'), ('stack', 1, 'w'), ('embed',),
      ('opt', 'mu', 'stack', 0, 'w')]))
  np.testing.assert_array_equal(scanned[('stack', 0, 'w')][:, 0], [1, 3])
  np.testing.assert_array_equal(scanned[('stack', 1, 'w')][:, 0], [2, 4])
  np.testing.assert_array_equal(scanned[('opt', 'mu', 'stack', 0, 'w')][:, 0], [10, 30])
  back = layout.to_unrolled(scanned, pat)
  assert back.keys() == flat.keys()
  for k in flat:
    np.testing.assert_array_equal(back[k], flat[k])


def _spec(name='tiny', **model):
  c = load_config(ROOT / 'configs' / f'{name}.py')
  for k, v in model.items():
    section, key = k.split('__')
    c[section][key] = v
  return model_spec(c)


SPECS = {
    # blocks 0 | (1 2)(3 4): an unrolled prefix, [MoE, dense] pairs; loss-free biases
    # and router jitter are state that a training call changes.
    'switch_prefix': dict(model__num_layers=5, moe__moe_every=2, moe__moe_offset=1,
                          moe__balancing='loss_free', moe__router_jitter=0.1),
    'dense': dict(moe__num_experts=0, model__num_layers=3),
}


def _flat(tree) -> dict:
  return traverse_util.flatten_dict(nnx.to_pure_dict(tree))


@pytest.mark.parametrize('name', [pytest.param('switch_prefix', marks=pytest.mark.slow),
                                  'dense'])
def test_same_seed_same_model_logits_and_gradients(name):
  spec = _spec(**SPECS[name])
  unrolled = TransformerLM(spec, rngs=nnx.Rngs(0))
  scanned = TransformerLM(dataclasses.replace(spec, scan_layers=True), rngs=nnx.Rngs(0))
  assert scanned.stack is not None and len(scanned.blocks) == scanned.pattern.prefix
  u, s = _flat(nnx.state(unrolled)), _flat(nnx.state(scanned))
  assert layout.to_unrolled(s, scanned.pattern).keys() == u.keys()
  for k, v in layout.to_unrolled(s, scanned.pattern).items():
    np.testing.assert_array_equal(jax.random.key_data(v) if k[-1] == 'key' else v,
                                  jax.random.key_data(u[k]) if k[-1] == 'key' else u[k])
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, spec.vocab_size)

  def loss(model):
    logits, aux = model(tokens, train=True)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0]) + aux['load_balance_loss']

  (lu, gu), (ls, gs) = (nnx.value_and_grad(loss)(m) for m in (unrolled, scanned))
  np.testing.assert_allclose(ls, lu, rtol=1e-6)
  gs = layout.to_unrolled(_flat(gs), scanned.pattern)
  scale = max(float(jnp.abs(g).max()) for g in _flat(gu).values())
  for k, g in _flat(gu).items():
    np.testing.assert_allclose(gs[k], g, atol=1e-6 * scale, err_msg=str(k))
  # The training call moved the same biases and RNG counters in both layouts.
  after = layout.to_unrolled(_flat(nnx.state(scanned, nnx.Not(nnx.Param))), scanned.pattern)
  for k, v in _flat(nnx.state(unrolled, nnx.Not(nnx.Param))).items():
    np.testing.assert_array_equal(*(jax.random.key_data(x) if k[-1] == 'key' else x
                                    for x in (after[k], v)), err_msg=str(k))
  assert relayout(relayout(scanned, False), True).pattern == scanned.pattern


def _config(**over):
  """test_scale's config: tiny with 8 experts, a routing group of one sequence and
  loss-free balancing, 4 blocks [dense, MoE] x 2, so the stack has two repeats."""
  c = load_config(ROOT / 'configs' / 'tiny.py')
  c.train.batch_size, c.moe.group_size, c.moe.num_experts = 16, 32, 8
  c.moe.balancing, c.moe.load_balance_coef = 'loss_free', 0.0
  c.model.num_layers = 4
  for key, value in over.items():
    section, name = key.split('.')
    c[section][name] = value
  return c


def _batches(n=3, batch=16, length=32):
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, 256, (n, batch, length + 1)).astype(np.int32)
  return [{'inputs': t[:, :-1], 'targets': t[:, 1:]} for t in tokens]


def _trace(config):
  n = config.mesh.data * config.mesh.expert              # 1: a one-device mesh
  spec = resolve(config, n)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.expert, 1, devices=jax.devices()[:n])
  steps = steps_lib.build(spec, mesh)
  state, rows = steps.state, []
  for b in _batches():
    state, m = steps.train(state, sharding.put_batch(b, mesh))
    rows.append(jax.device_get(m))
  return rows


@pytest.mark.parametrize('over', [
    pytest.param({'mesh.data': 1, 'mesh.expert': 1}, marks=pytest.mark.slow),
    {'mesh.data': 2, 'mesh.expert': 4, 'mesh.fsdp': True, 'train.microbatches': 2,
     'train.remat': 'block'},
    pytest.param({'mesh.data': 1, 'mesh.expert': 8, 'train.remat': 'dots',
                  'moe.dispatch': 'dropless'}, marks=pytest.mark.slow)], ids=str)
def test_scanned_trace_equals_unrolled(over):
  ref = _trace(_config(**over))
  rows = _trace(_config(**over, **{'model.scan_layers': True}))
  for key in ('loss', 'total_loss', 'grad_norm', 'moe/1/expert_load', 'moe/3/max_violation'):
    np.testing.assert_allclose([r[key] for r in rows], [r[key] for r in ref], rtol=1e-6,
                               atol=1e-7, err_msg=key)


def test_a_checkpoint_resumes_in_the_other_layout(tmp_path):
  """(model, optimizer) saved in one layout restores into the other, both ways, and the
  next step is the step the saving layout would have taken."""
  b = _batches(n=2)
  built = {}
  for scan in (False, True):
    spec = resolve(_config(**{'model.scan_layers': scan}), jax.device_count())
    mesh = loop.make_mesh(spec)
    built[scan] = (spec, mesh, steps_lib.build(spec, mesh))
  for scan in (False, True):
    spec, mesh, steps = built[scan]
    state, _ = steps.train(steps.state, sharding.put_batch(b[0], mesh))
    ckpt = checkpoint.Checkpoints(tmp_path / str(scan), keep=2)
    ckpt.save(1, state, None, _config(**{'model.scan_layers': scan}), wait=True)
    _, want = steps.train(state, sharding.put_batch(b[1], mesh))
    other_spec, other_mesh, other = built[not scan]
    restored = ckpt.restore(1, other.state, other.shardings)
    ckpt.close()
    _, got = other.train(restored, sharding.put_batch(b[1], other_mesh))
    np.testing.assert_allclose(got['loss'], want['loss'], rtol=1e-6)
    np.testing.assert_allclose(got['grad_norm'], want['grad_norm'], rtol=1e-6)


def test_stacked_kernels_keep_per_layer_budgets():
  """GMP on a stacked kernel prunes each layer to its own count, uniform or ERK: the
  masks are the unrolled model's, stacked."""
  spec = _spec(model__num_layers=4, moe__num_experts=0)
  models = {s: TransformerLM(dataclasses.replace(spec, scan_layers=s), rngs=nnx.Rngs(0))
            for s in (False, True)}
  for distribution in ('uniform', 'erk'):
    masks = {}
    for scan, model in models.items():
      r = roles.param_roles(model)
      tx = pruning.wrap(optax.sgd(0.0), 0.6, schedule='one_shot', distribution=distribution,
                        prunable=roles.prunable(r), stacked=roles.stacked(r))
      params = nnx.state(model, nnx.Param)
      _, state = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
      masks[scan] = {k: v for k, v in _flat(pruning.masks(state)).items() if v is not None}
    want = layout.to_scanned(masks[False], models[True].pattern)
    assert want.keys() == masks[True].keys()
    for k in want:
      np.testing.assert_array_equal(masks[True][k], want[k], err_msg=f'{distribution} {k}')
    wi = masks[True][('stack', 0, 'ffn', 'wi')]
    assert len({int(m.sum()) for m in wi}) == 1 and 0 < wi.mean() < 1


@pytest.mark.slow
def test_one_shot_pruning_accounting_and_upcycling_see_the_unrolled_model():
  spec = _spec(**SPECS['switch_prefix'])
  unrolled = TransformerLM(spec, rngs=nnx.Rngs(0))
  scanned = TransformerLM(dataclasses.replace(spec, scan_layers=True), rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(2), (4, 16), 0, spec.vocab_size)
  for fn in (lambda m: accounting.params_from_model(m), lambda m: accounting.flops_from_model(m, 16)):
    assert fn(scanned) == fn(unrolled)
  mu = post_training.prune_model(unrolled, tokens, method='wanda', sparsity=0.5)
  ms = post_training.prune_model(scanned, tokens, method='wanda', sparsity=0.5)
  want = layout.to_scanned(mu, scanned.pattern)
  assert want.keys() == ms.keys()
  for k in want:
    np.testing.assert_array_equal(ms[k], want[k], err_msg=str(k))
  np.testing.assert_allclose(scanned(tokens)[0], unrolled(tokens)[0], atol=1e-5)
  with pytest.raises(ValueError, match='relayout'):
    compaction.compact(scanned.spec, nnx.state(scanned), {})
  dense = TransformerLM(_spec(moe__num_experts=0, model__num_layers=5), rngs=nnx.Rngs(3))
  moe = upcycle(dense, dataclasses.replace(spec, scan_layers=True))
  np.testing.assert_array_equal(
      moe.stack[0].ffn.experts.wi[...][1, 2], dense.blocks[3].ffn.wi[...])


@pytest.mark.slow
def test_hub_and_generation_with_a_scanned_model(tmp_path):
  """DeepSeek-V3 (a dense first block, MoE after it, latent attention): scanned, it gives
  transformers' logits and greedy continuation, and exports the same files."""
  ref = np.load(HF / 'deepseek_v3' / 'reference.npz')
  model, spec = hub.load_hf(HF / 'deepseek_v3')
  scanned = relayout(model, True)
  assert scanned.pattern.prefix == 1 and scanned.pattern.repeats == spec.num_layers - 1
  np.testing.assert_allclose(scanned(jnp.asarray(ref['tokens']))[0], ref['logits'], atol=1e-4)
  new = inference.generate(scanned, ref['prompt'], ref['greedy'].shape[1])
  np.testing.assert_array_equal(np.asarray(new), ref['greedy'])
  a = hub.save_hf(model, spec, tmp_path / 'a', source=HF / 'deepseek_v3')
  b = hub.save_hf(scanned, spec, tmp_path / 'b', source=HF / 'deepseek_v3')
  fa, fb = st.read_folder(a), st.read_folder(b)
  assert fa.keys() == fb.keys()
  assert (a / 'model.safetensors').read_bytes() == (b / 'model.safetensors').read_bytes()
  # On a data 2 x expert 4 mesh the stacked cache is split with the batch.
  mesh = sharding.make_mesh(2, 4)
  scanned = relayout(hub.load_hf(HF / 'deepseek_v3', mesh=mesh)[0], True)
  new = inference.generate(scanned, ref['prompt'][:1], 6)
  np.testing.assert_array_equal(np.asarray(new), ref['greedy'][:1, :6])
  assert scanned.stack[0].ffn.experts.wi[...].sharding.spec[:2] == (None, 'expert')


@pytest.mark.slow
def test_a_scanned_run_compresses_and_trains_on_scanned(tmp_path, data_dir):
  """train (scanned) -> compress --method=wanda (pruned block by block, written back
  stacked) -> continue training scanned: every layer of a stacked kernel keeps its half."""
  from sparse_jax import compress
  c = load_config(ROOT / 'configs' / 'tiny.py')
  c.data.data_dir, c.model.num_layers, c.model.scan_layers = data_dir, 4, True
  c.train.update(steps=3, checkpoint_every=3, eval_every=3)
  assert loop.train(c, tmp_path / 'src') == 0
  compress.compress(compress.Options(workdir=str(tmp_path / 'src'), out=str(tmp_path / 'dst'),
                                     method='wanda', sparsity=0.5))
  c = load_config(tmp_path / 'dst' / 'config.py')
  assert c.model.scan_layers
  c.train.steps = 5
  assert loop.train(c, tmp_path / 'dst') == 0
  _, _, model = checkpoint.load_model(tmp_path / 'dst', loop.make_mesh(resolve(c, 8)))
  wi = np.asarray(model.stack[0].ffn.wi[...])                         # [G=2, D, F]
  assert wi.shape[0] == 2
  assert [(w == 0).mean() for w in wi] == [0.5, 0.5]
