"""sparse_jax: mixture-of-experts, pruning and sparsity for JAX/Flax NNX research."""
from sparse_jax import config, data, dispatch, models, moe, routing, sharding, steps

__version__ = '0.1.0'
__all__ = ['config', 'data', 'dispatch', 'models', 'moe', 'routing', 'sharding', 'steps']
