"""Compaction of structured pruning: the compact model computes what the masked one did."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sparse_jax import models
from sparse_jax.analysis import accounting
from sparse_jax.config import base_config, model_spec
from sparse_jax.pruning.compaction import compact


def _config(num_experts=0):
  c = base_config()
  c.model.update(d_model=32, num_layers=2, num_heads=4, d_ff=64)
  c.moe.update(num_experts=num_experts, capacity_factor=4.0)
  return c


def _kept(c, n_ffn, n_heads, seed=0):
  rng = np.random.default_rng(seed)
  kept = {}
  for i in range(c.model.num_layers):
    if not (c.moe.num_experts and i % 2 == 1):
      kept[('blocks', i, 'ffn')] = rng.choice(c.model.d_ff, n_ffn, replace=False)
    kept[('blocks', i, 'attn')] = rng.choice(c.model.num_heads, n_heads, replace=False)
  return kept


def _mask(model, kept, head_dim):
  """Zero every pruned neuron's column/row and every pruned head's q/k/v columns and wo rows."""
  for (_, i, kind), idx in kept.items():
    block = model.blocks[i]
    if kind == 'ffn':
      keep = np.isin(np.arange(block.ffn.wi[...].shape[1]), idx)
      block.ffn.wi[...] = block.ffn.wi[...] * keep
      block.ffn.wo[...] = block.ffn.wo[...] * keep[:, None]
    else:
      heads = np.isin(np.arange(block.attn.num_heads), idx)
      keep = np.repeat(heads, head_dim)
      for w in (block.attn.wq, block.attn.wk, block.attn.wv):
        w[...] = w[...] * keep
      block.attn.wo[...] = block.attn.wo[...] * keep[:, None]


@pytest.mark.parametrize('num_experts', [4, pytest.param(0, marks=pytest.mark.slow)])
def test_compacted_logits_equal_masked_logits(num_experts):
  c = _config(num_experts)
  model = models.TransformerLM(model_spec(c), rngs=nnx.Rngs(0))
  kept = _kept(c, n_ffn=16, n_heads=2)
  _mask(model, kept, head_dim=8)
  new_spec, new_state = compact(model_spec(c), nnx.state(model), kept)
  assert (new_spec.d_ff, new_spec.num_heads, new_spec.head_dim) == (16, 2, 8)
  small = models.TransformerLM(new_spec, rngs=nnx.Rngs(1))
  nnx.update(small, new_state)
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 256)
  np.testing.assert_allclose(small(tokens)[0], model(tokens)[0], atol=2e-5, rtol=1e-5)
  # The parameter count shrinks by exactly the pruned rows and columns.
  n = lambda m: sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
  dense_blocks = 2 if num_experts == 0 else 1
  assert n(model) - n(small) == dense_blocks * 2 * 32 * 48 + 2 * 4 * 32 * 16
  counts = accounting.params_from_config(new_spec)
  assert n(small) == counts['total'] + counts['embedding']


def test_structured_pruning_masks_then_compaction():
  """sparse_jax.pruning's group scores pick the neurons and heads; compact() keeps them."""
  from sparse_jax import pruning
  c = _config()
  model = models.TransformerLM(model_spec(c), rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  _, kept_ffn = pruning.structured_masks(params, 0.75, 'ffn_neurons')
  _, kept_heads = pruning.structured_masks(params, 0.5, 'heads', num_heads=4)
  kept = {**kept_ffn, **kept_heads}
  assert {len(v) for v in kept_ffn.values()} == {16} and {len(v) for v in kept_heads.values()} == {2}
  _mask(model, kept, head_dim=8)
  new_spec, new_state = compact(model_spec(c), nnx.state(model), kept)
  small = models.TransformerLM(new_spec, rngs=nnx.Rngs(1))
  nnx.update(small, new_state)
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 256)
  np.testing.assert_allclose(small(tokens)[0], model(tokens)[0], atol=2e-5, rtol=1e-5)


def test_optimizer_state_is_compacted_too():
  c = _config()
  model = models.TransformerLM(model_spec(c), rngs=nnx.Rngs(0))
  opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
  grads = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param))
  opt.update(model, grads)
  kept = _kept(c, n_ffn=16, n_heads=2)
  new_spec, new_state = compact(model_spec(c), nnx.state((model, opt)), kept)
  small = models.TransformerLM(new_spec, rngs=nnx.Rngs(1))
  small_opt = nnx.Optimizer(small, optax.adam(1e-3), wrt=nnx.Param)
  nnx.update((small, small_opt), new_state)              # shapes and structure match
  idx = np.sort(kept[('blocks', 0, 'ffn')])
  mu_old = opt.opt_state[0].mu['blocks'][0]['ffn']['wi'][...]
  np.testing.assert_array_equal(small_opt.opt_state[0].mu['blocks'][0]['ffn']['wi'][...],
                                mu_old[:, idx])
  assert int(small_opt.step[...]) == 1


def test_uneven_counts_are_refused():
  c = _config()
  model = models.TransformerLM(model_spec(c), rngs=nnx.Rngs(0))
  kept = _kept(c, n_ffn=16, n_heads=2)
  kept[('blocks', 1, 'ffn')] = np.arange(20)
  with pytest.raises(ValueError, match=r'same number of kept FFN neurons.*\[16, 20\]'):
    compact(model_spec(c), nnx.state(model), kept)
