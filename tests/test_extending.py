"""docs/extending.md's recipes, kept honest: a new router and a new expert type plug
into MoE in a few lines and work under expert parallelism."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType

import sparse_jax as sj


class CosineRouter(sj.moe.Router):
  """Logits = cosine(x, expert embedding) / temperature (X-MoE style)."""

  def __call__(self, x, *, train=False):
    x = x.astype(jnp.float32)
    xn = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    kn = self.kernel[...] / jnp.linalg.norm(self.kernel[...], axis=0, keepdims=True)
    return jnp.einsum('...d,de->...e', xn, kn) / 0.07


class BiasedExperts(sj.moe.Experts):
  """Experts with an output bias bo [E, D]; every weight keeps the leading E axis."""

  def __init__(self, num_experts, d_model, d_ff, *, rngs, mesh=None):
    super().__init__(num_experts, d_model, d_ff, rngs=rngs, mesh=mesh)
    self.bo = nnx.Param(jnp.full((num_experts, d_model), 0.5))

  def weights(self):
    return {**super().weights(), 'bo': self.bo[...]}

  def param_roles(self):                                   # an expert parameter, not a kernel
    return {**super().param_roles(), 'bo': sj.roles.Role('expert')}

  def apply(self, w, x):                                   # x [E, N, D]
    return super().apply(w, x) + w['bo'][:, None, :]


def _layer(mesh=None, group_size=None):
  rngs = nnx.Rngs(0)
  return sj.moe.MoE(8, 16, 4, capacity_factor=4.0, mesh=mesh, group_size=group_size,
                    router=CosineRouter(8, 4, rngs=rngs),
                    experts=BiasedExperts(4, 8, 16, rngs=rngs, mesh=mesh))


def test_custom_router_and_experts_single_device():
  layer = _layer()
  x = jax.random.normal(jax.random.key(0), (2, 4, 8))
  y = nnx.jit(lambda m, x: m(x)[0])(layer, x)
  # With capacity for everyone, each token gets p_e * (ffn_e(x) + bo_e) of its top expert.
  logits = np.asarray(layer.router(x)).reshape(-1, 4)
  probs = np.asarray(jax.nn.softmax(logits))
  w = {n: np.asarray(v) for n, v in layer.experts.weights().items()}
  xt = np.asarray(x).reshape(-1, 8)
  want = [probs[t, e] * (np.asarray(jax.nn.gelu(xt[t] @ w['wi'][e])) @ w['wo'][e]
                         + w['bo'][e]) for t, e in enumerate(probs.argmax(-1))]
  np.testing.assert_allclose(np.asarray(y).reshape(-1, 8), np.stack(want), atol=1e-5)


def test_custom_modules_under_expert_parallelism():
  mesh = jax.make_mesh((2, 4), ('data', 'expert'), axis_types=(AxisType.Auto,) * 2)
  x = jax.random.normal(jax.random.key(0), (8, 4, 8))
  ref, ep = _layer(group_size=4), _layer(mesh=mesh)
  nnx.update(ep, jax.device_get(nnx.state(ref)))
  np.testing.assert_allclose(nnx.jit(lambda m, x: m(x)[0])(ep, x), ref(x)[0], atol=1e-5)


def test_a_new_parameter_has_the_role_its_module_names():
  """bo is an expert parameter but not a kernel: pruning leaves it, accounting counts it
  with the experts; without param_roles it would be 'other' and still never pruned."""
  layer = _layer()
  roles = sj.roles.param_roles(layer)
  assert roles[('experts', 'bo')] == sj.roles.Role('expert')
  assert roles[('experts', 'wi')] == sj.roles.Role('expert', 1)
  assert roles[('router', 'kernel')].kind == 'router'
  prunable = sj.roles.prunable(roles)
  flat = dict(nnx.to_flat_state(nnx.state(layer, nnx.Param)))
  assert {p for p, v in flat.items() if prunable(p, v[...])} == {
      ('experts', 'wi'), ('experts', 'wo')}

  class Unnamed(BiasedExperts):
    def param_roles(self):
      return sj.moe.Experts.param_roles(self)
  rngs = nnx.Rngs(0)
  bare = sj.moe.MoE(8, 16, 4, experts=Unnamed(4, 8, 16, rngs=rngs), rngs=rngs)
  assert sj.roles.param_roles(bare)[('experts', 'bo')] == sj.roles.Role('other')
