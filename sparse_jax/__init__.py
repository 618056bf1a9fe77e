"""sparse_jax: mixture-of-experts, pruning and sparsity for JAX/Flax NNX research."""
from sparse_jax import dispatch, moe, routing, sharding

__version__ = '0.1.0'
__all__ = ['dispatch', 'moe', 'routing', 'sharding']
