"""Generation: a KV cache, sampling, prefill and decode steps, and `generate`.

`generate` loads on first use, so the layers can import the cache without the models.
"""
import importlib

__all__ = ['cache', 'sampling', 'generation', 'generate', 'GenerationError']


def __getattr__(name):
  if name in ('cache', 'sampling', 'generation'):
    return importlib.import_module(f'sparse_jax.inference.{name}')
  if name in ('generate', 'GenerationError'):
    return getattr(importlib.import_module('sparse_jax.inference.generation'), name)
  raise AttributeError(f"module 'sparse_jax.inference' has no attribute {name!r}")
