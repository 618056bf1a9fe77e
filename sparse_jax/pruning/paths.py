"""Pytree paths as plain keys, and which leaves are pruned by default.

A path is the tuple of plain keys from the root (str / int): jax's DictKey, GetAttrKey and
SequenceKey wrappers are stripped and the trailing 'value' of flax nnx Variables is
dropped, so a nested dict of arrays and `nnx.state(model, nnx.Param)` (with or without
its Param wrappers) give the same paths, e.g. ('blocks', 0, 'ffn', 'wi').
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

# Kernels of FFNs, experts and attention in sparse_jax.models / sparse_jax.moe.
KERNEL_NAMES = frozenset({'wi', 'wi_gate', 'wo', 'wq', 'wk', 'wv',
                          'wq_a', 'wq_b', 'wkv_a', 'wkv_b'})     # sparse_jax.mla
# Never pruned by default, wherever they appear on the path.
PROTECTED = frozenset({'router', 'embed', 'unembed', 'embedding', 'scale', 'bias'})


def plain_key(k) -> Any:
  for attr in ('key', 'name', 'idx'):     # DictKey / FlattenedIndexKey, GetAttrKey, SequenceKey
    if hasattr(k, attr):
      return getattr(k, attr)
  return k


def plain_path(path) -> tuple:
  p = tuple(plain_key(k) for k in path)
  return p[:-1] if len(p) > 1 and p[-1] == 'value' else p


def is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def unwrap(x):
  return x.get_value() if is_variable(x) else x


def flatten(tree) -> tuple[list[tuple], list, Any]:
  """-> (paths, arrays, treedef) with nnx Variables counted as leaves and unwrapped.

  `treedef.unflatten(xs)` puts plain values where the Variables were; the leaf order is
  the order of `jax.tree.leaves(tree)` (a Variable holds exactly one array).
  """
  kv, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_variable)
  return [plain_path(p) for p, _ in kv], [unwrap(x) for _, x in kv], treedef


def default_prunable(path: tuple, leaf) -> bool:
  """2-D kernels and 3-D stacked-expert kernels of FFNs and attention, by name: the
  default of pruning.wrap for any pytree. For a sparse_jax model the commands ask the
  model instead (sparse_jax.roles.prunable); both pick the same leaves of its models.

  Named wi, wi_gate, wo (dense FFN, Experts), wq, wk, wv, wo (Attention) or wq_a, wq_b,
  wkv_a, wkv_b (LatentAttention); never
  embeddings, norms, routers or biases. Decides from path, rank and dtype only, so it
  also works on tracers.
  """
  return (bool(path) and path[-1] in KERNEL_NAMES
          and getattr(leaf, 'ndim', 0) in (2, 3)
          and jnp.issubdtype(leaf.dtype, jnp.floating)
          and not any(isinstance(k, str) and k in PROTECTED for k in path))


def path_str(path: tuple) -> str:
  return '/'.join(str(k) for k in path)
