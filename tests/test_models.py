"""The transformer LM: block layout, causality, sharded vs single device, accounting."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sparse_jax as sj
from sparse_jax import models
from sparse_jax.analysis import accounting
from sparse_jax.config import base_config, model_spec
from sparse_jax.training import steps


def _tiny(num_experts=4, **moe):
  c = base_config()
  c.model.update(d_model=32, num_layers=4, num_heads=2, d_ff=64)
  c.moe.update(num_experts=num_experts, **moe)
  c.train.update(seq_len=16, batch_size=8)
  return c


def test_block_layout_moe_every_and_offset():
  c = _tiny(moe_every=2, moe_offset=1)
  m = models.TransformerLM(model_spec(c), rngs=nnx.Rngs(0))
  kinds = [type(b.ffn).__name__ for b in m.blocks]
  assert kinds == ['DenseFFN', 'MoE', 'DenseFFN', 'MoE']
  c = _tiny(moe_every=3, moe_offset=0)
  kinds = [type(b.ffn).__name__ for b in models.TransformerLM(model_spec(c),
                                                               rngs=nnx.Rngs(0)).blocks]
  assert kinds == ['MoE', 'DenseFFN', 'DenseFFN', 'MoE']


def test_causal_future_tokens_do_not_change_past_logits():
  c = _tiny()
  tokens = jax.random.randint(jax.random.key(0), (1, 16), 0, 256)
  # One sequence = one routing group; capacity large enough that a later token cannot
  # take an earlier token's slot (capacity is the one non-causal coupling of top-k MoE).
  c.moe.capacity_factor = 4.0
  m = models.TransformerLM(model_spec(c), rngs=nnx.Rngs(0))
  logits = nnx.jit(lambda m, t: m(t)[0])
  a, b = logits(m, tokens), logits(m, tokens.at[0, 10:].set(7))
  np.testing.assert_allclose(a[0, :10], b[0, :10], atol=1e-5)
  assert not np.allclose(a[0, 10:], b[0, 10:])


def test_aux_losses_sum_over_moe_blocks():
  c = _tiny()
  m = models.TransformerLM(model_spec(c), rngs=nnx.Rngs(0))
  _, aux = nnx.jit(lambda m, t: m(t))(m, jnp.zeros((2, 16), jnp.int32) + jnp.arange(16))
  assert sorted(aux['layers']) == [1, 3]
  np.testing.assert_allclose(aux['load_balance_loss'],
                             sum(l['load_balance_loss'] for l in aux['layers'].values()))
  _, aux = models.TransformerLM(model_spec(_tiny(0)), rngs=nnx.Rngs(0))(
      jnp.zeros((2, 16), jnp.int32))
  assert aux['layers'] == {} and float(aux['load_balance_loss']) == 0.0


def test_untied_output_and_swiglu():
  c = _tiny()
  c.model.update(tie_embeddings=False, activation='swiglu')
  m = models.TransformerLM(model_spec(c), rngs=nnx.Rngs(0))
  logits, _ = m(jnp.zeros((2, 16), jnp.int32))
  assert logits.shape == (2, 16, 256) and m.unembed[...].shape == (32, 256)
  n = sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
  counts = accounting.params_from_config(model_spec(c))
  assert n == counts['total'] + counts['embedding']


@pytest.mark.parametrize('num_experts,k,shared', [(0, 1, 0), (4, 1, 0), (4, 2, 8)])
def test_count_params_matches_the_model(num_experts, k, shared):
  c = _tiny(num_experts, k=k, shared_d_ff=shared)
  m = models.TransformerLM(model_spec(c), rngs=nnx.Rngs(0))
  n = sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
  counts = accounting.params_from_config(model_spec(c))
  assert n == counts['total'] + counts['embedding']
  d, f = 32, 64
  if num_experts:
    # Two MoE blocks: each token uses k of the 4 experts (plus router and shared expert).
    unused = 2 * (num_experts - k) * 2 * d * f
    assert counts['total'] - counts['active'] == unused
  else:
    assert counts['total'] == counts['active']


def test_flops_per_token_by_hand():
  c = _tiny(0)
  c.model.num_layers = 1
  d, f, v, l = 32, 64, 256, 16
  # attention 4 d^2 + FFN 2 d f + output projection d v, x2 FLOPs; scores 2 * 2 L d.
  want = 2 * (4 * d * d + 2 * d * f + d * v) + 2 * 2 * l * d
  got = accounting.flops_from_config(model_spec(c), c.train.seq_len)
  assert got['forward'] == want and got['train'] == 3 * want


@pytest.mark.parametrize('shape', [(2, 2, 2), *(pytest.param(s, marks=pytest.mark.slow)
                                                 for s in [(1, 8, 1), (2, 4, 1), (8, 1, 1)])])
def test_sharded_model_matches_single_device(shape):
  """Loss and gradients of the LM on a mesh (data, expert, model) vs one device with the
  same routing groups; model=2 splits attention heads and dense FFN width."""
  c = _tiny(8, capacity_factor=1.0)
  mesh = sj.sharding.make_mesh(data=shape[0], expert=shape[1], model=shape[2])
  tokens = jax.random.randint(jax.random.key(1), (8, 17), 0, 256)
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:]}
  c.moe.group_size = 16 * 8 // (shape[0] * shape[1])   # the tokens of one token shard
  ref = models.TransformerLM(model_spec(c), rngs=nnx.Rngs(0))
  c.moe.group_size = 0                       # sharded: all tokens of a device
  ep = models.TransformerLM(model_spec(c), mesh=mesh, rngs=nnx.Rngs(0))
  nnx.update(ep, jax.device_get(nnx.state(ref)))
  sj.sharding.put_params(ep, mesh)
  d = c.model.d_model
  assert ep.blocks[0].attn.wq[...].addressable_shards[0].data.shape == (d, d // shape[2])
  assert ep.blocks[0].ffn.wi[...].addressable_shards[0].data.shape == (d, 64 // shape[2])

  def grads(model, batch):
    loss = lambda m: steps.lm_loss(m, batch, train=True, lb_coef=0.01, z_coef=1e-3)[0]
    return nnx.jit(nnx.value_and_grad(loss))(model)

  l0, g0 = grads(ref, batch)
  l1, g1 = grads(ep, sj.sharding.put_batch(batch, mesh))
  np.testing.assert_allclose(l1, l0, rtol=1e-5)
  flat1 = dict(nnx.to_flat_state(g1))
  for path, v in nnx.to_flat_state(g0):
    np.testing.assert_allclose(flat1[path][...], v[...], atol=2e-5, rtol=1e-4,
                               err_msg=str(path))


def test_tiny_loss_trace_is_what_it_was(data_dir, tmp_path, monkeypatch):
  """configs/tiny.py trains as it did before the architectures of imported models (GQA,
  q/k norms, biases, latent attention, other routers) were added: every new field's
  default is the old behaviour. Bit for bit on the CPU model that recorded the trace;
  elsewhere XLA may order reductions differently, so to float32 noise."""
  import json
  import pathlib
  from sparse_jax import data
  from sparse_jax.config import load_config
  from sparse_jax.training import loop
  root = pathlib.Path(__file__).resolve().parents[1]
  ref = json.loads((root / 'tests' / 'data' / 'tiny_trace.json').read_text())
  if data.prepare('stdlib', data_dir, verbose=False).get('fingerprint') != ref['corpus']:
    pytest.skip('another corpus (another Python version): the trace cannot match')
  monkeypatch.setenv('SPARSE_JAX_DATA', data_dir)
  assert jax.device_count() == ref['devices']
  assert loop.train(load_config(root / 'configs' / 'tiny.py'), tmp_path / 'run') == 0
  rows = [json.loads(l) for l in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
  loss = [r['loss'] for r in rows if 'split' not in r]
  if _cpu_flags_sha256() == ref['cpu_flags_sha256']:
    assert loss == ref['loss']
  else:
    np.testing.assert_allclose(loss, ref['loss'], rtol=1e-5)


def _cpu_flags_sha256():
  """sha256 of this CPU's sorted feature flags (what XLA:CPU compiles for), or None."""
  import hashlib
  import pathlib
  import re
  cpu = pathlib.Path('/proc/cpuinfo')
  found = re.search(r'^flags\s*: (.*)$', cpu.read_text(), re.M) if cpu.exists() else None
  return found and hashlib.sha256(' '.join(sorted(found.group(1).split())).encode()).hexdigest()
