"""The roles of a model's parameters, as the model names them.

Every module of sparse_jax names the role of each parameter it owns in `param_roles()`
(attribute -> Role): what the parameter is part of and, for a kernel, which axis its input
multiplies. Pruning, one-shot calibration and accounting ask `param_roles(model)` instead
of matching parameter names, so a new kind of tensor is pruned and counted as its module
says, and a parameter that no module names (a user's own module without `param_roles`) is
'other': counted, never pruned.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax.numpy as jnp
from flax import nnx

# embedding: token embeddings and the output projection; attention: q/k/v/o kernels and
# their biases; ffn: a dense block's FFN; expert: routed experts, stacked [E, ...]; shared:
# the always-on shared expert; gate: the shared expert's gate; router: router kernels;
# norm: RMSNorm scales; other: no module names it.
KINDS = ('embedding', 'attention', 'ffn', 'expert', 'shared', 'gate', 'router', 'norm',
         'other')

# What pruning.targets selects: the kernels of these kinds.
TARGET_KINDS = {'all': ('attention', 'ffn', 'expert', 'shared'),
                'ffn': ('ffn', 'expert', 'shared'), 'attn': ('attention',)}
TARGETS = tuple(TARGET_KINDS)


@dataclasses.dataclass(frozen=True)
class Role:
  """kind: one of KINDS. in_axis: for a kernel, the axis the layer's input multiplies
  (0 for [in, out], 1 for stacked experts [E, in, out]); None for anything else.
  stacked: the leading axis holds the layers of a scanned stack [G, ...] (in_axis counts
  it), each pruned and counted as its own layer."""
  kind: str
  in_axis: int | None = None
  stacked: bool = False

  @property
  def kernel(self) -> bool:
    return self.in_axis is not None


def _plain(path) -> tuple:
  return tuple(getattr(k, 'key', k) for k in path)


def param_roles(model: nnx.Module) -> dict[tuple, Role]:
  """{path of the parameter (plain keys, as in pruning.masks): Role} for every nnx.Param
  of the model; a parameter no module names gets Role('other')."""
  named = {}
  stacks = getattr(model, 'stacked_paths', tuple)()
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Module) and hasattr(node, 'param_roles'):
      path = _plain(path)
      under = any(path[:len(s)] == s for s in stacks)
      for name, role in node.param_roles().items():
        named[path + (name,)] = role if not under else dataclasses.replace(
            role, stacked=True, in_axis=None if role.in_axis is None else role.in_axis + 1)
  return {p: named.get(p, Role('other', stacked=any(p[:len(s)] == s for s in stacks)))
          for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def stacked(roles: dict[tuple, Role]) -> Callable[[tuple, object], bool]:
  """(path, leaf) -> bool: the leaf's leading axis is a scanned stack's layers."""
  keep = {p for p, r in roles.items() if r.stacked}
  return lambda path, leaf: tuple(path) in keep


def prunable(roles: dict[tuple, Role], targets: str = 'all') -> Callable[[tuple, object], bool]:
  """(path, leaf) -> bool for pruning.wrap / one-shot: the floating kernels whose kind
  pruning.targets selects ('all', 'ffn' or 'attn'); never embeddings, routers, gates,
  norms or biases."""
  if targets not in TARGET_KINDS:
    raise ValueError(f'targets={targets!r} is unknown; use one of {TARGETS}.')
  keep = {p for p, r in roles.items() if r.kernel and r.kind in TARGET_KINDS[targets]}
  return lambda path, leaf: (tuple(path) in keep
                             and jnp.issubdtype(leaf.dtype, jnp.floating))
