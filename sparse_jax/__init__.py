"""sparse_jax: mixture-of-experts, pruning and sparsity for JAX/Flax NNX research.

Submodules load on first use (`sparse_jax.moe`, `sparse_jax.pruning`, ...), so importing
the layer library does not pull in the data, checkpoint or plotting stacks.
"""
import importlib

__version__ = '0.1.0'
__all__ = ['analysis', 'config', 'data', 'dispatch', 'hub', 'layers', 'mla', 'models', 'moe',
           'inference', 'pruning', 'roles', 'routing', 'sharding', 'specs', 'training', 'upcycle']


def __getattr__(name):
  if name in __all__:
    return importlib.import_module(f'sparse_jax.{name}')
  raise AttributeError(f"module 'sparse_jax' has no attribute {name!r}")
