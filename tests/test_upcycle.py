"""Sparse upcycling: the exact relation to the dense model at initialisation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_jax import models
from sparse_jax.config import base_config, model_spec
from sparse_jax.upcycle import upcycle


def _configs(k=1, normalize=True, cf=4.0, shared_d_ff=0):
  dense = base_config()
  dense.model.update(d_model=32, num_layers=4, num_heads=2, d_ff=64)
  moe = base_config()
  moe.model.update(d_model=32, num_layers=4, num_heads=2, d_ff=64)
  moe.moe.update(num_experts=4, k=k, capacity_factor=cf, normalize_weights=normalize,
                 shared_d_ff=shared_d_ff, init_scale=0.1)
  return dense, moe


@pytest.mark.parametrize('k,shared_d_ff', [(1, 16), *(pytest.param(*c, marks=pytest.mark.slow) for c in [(2, 0), (1, 0)])])
def test_upcycled_model_computes_the_dense_function(k, shared_d_ff):
  dense_cfg, moe_cfg = _configs(k=k, shared_d_ff=shared_d_ff)
  dense = models.TransformerLM(model_spec(dense_cfg), rngs=nnx.Rngs(0))
  moe = upcycle(dense, model_spec(moe_cfg))
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 256)
  want, _ = dense(tokens)
  got, aux = moe(tokens)
  # Identical experts and combine weights summing to 1 (capacity for every token).
  assert sorted(aux['layers']) == [1, 3] and float(aux['layers'][1]['dropped_fraction']) == 0
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
  assert moe.blocks[1].ffn.experts.wi[...].shape == (4, 32, 64)
  np.testing.assert_array_equal(moe.blocks[1].ffn.experts.wo[...][3],
                                dense.blocks[1].ffn.wo[...])
  np.testing.assert_array_equal(moe.embed[...], dense.embed[...])
  if shared_d_ff:   # the shared expert starts as a zero function that can still learn
    shared = moe.blocks[1].ffn.shared
    assert float(jnp.abs(shared.wo[...]).max()) == 0.0
    assert float(jnp.abs(shared.wi[...]).max()) > 0.0
  # The router takes its own init scale (variance 0.01 / D), not the experts' 0.1.
  std = float(jnp.std(moe.blocks[1].ffn.router.kernel[...]))
  assert 0.5 * (0.01 / 32) ** 0.5 < std < 1.5 * (0.01 / 32) ** 0.5


def test_switch_weights_scale_the_dense_ffn_by_the_router_probability():
  """Without renormalisation (Switch, k=1) each token's FFN output is scaled by p_e < 1."""
  dense_cfg, moe_cfg = _configs(k=1, normalize=None)
  dense = models.TransformerLM(model_spec(dense_cfg), rngs=nnx.Rngs(0))
  moe = upcycle(dense, model_spec(moe_cfg), router_init_scale=0.01)
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 256)
  assert not np.allclose(moe(tokens)[0], dense(tokens)[0], atol=1e-3)
  # Near-uniform fresh router: p_e close to 1/E for every token.
  x = jnp.take(moe.embed[...], tokens, axis=0)
  probs = jax.nn.softmax(moe.blocks[1].ffn.router(x))
  np.testing.assert_allclose(probs, 0.25, atol=0.05)


def test_noise_makes_experts_differ_and_bad_shapes_are_refused():
  dense_cfg, moe_cfg = _configs()
  dense = models.TransformerLM(model_spec(dense_cfg), rngs=nnx.Rngs(0))
  wi = upcycle(dense, model_spec(moe_cfg), noise=0.01).blocks[1].ffn.experts.wi[...]
  assert not np.allclose(wi[0], wi[1])
  np.testing.assert_allclose(wi[0], dense.blocks[1].ffn.wi[...], atol=0.01)
  moe_cfg.moe.d_ff = 32
  with pytest.raises(ValueError, match=r'expert width \(32\).*dense d_ff \(64\)'):
    upcycle(dense, model_spec(moe_cfg))
