"""sparse_jax: mixture-of-experts, pruning and sparsity for JAX/Flax NNX research."""
from sparse_jax import (compaction, config, data, dispatch, models, moe, pruning, routing,
                        sharding, sparsity, steps, upcycle)

__version__ = '0.1.0'
__all__ = ['compaction', 'config', 'data', 'dispatch', 'models', 'moe', 'pruning', 'routing',
           'sharding', 'sparsity', 'steps', 'upcycle']
