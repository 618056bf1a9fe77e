"""Structured groups of the TransformerLM: FFN neurons, attention heads, whole experts.

Shape legend: D d_model, F d_ff, E experts, H heads, Dh head dim, R rows, U groups per row.
Layouts (sparse_jax.moe, sparse_jax.layers):
  dense FFN   .../ffn/{wi, wi_gate} [D, F], .../ffn/wo [F, D]; neuron j = column j of
              wi (and wi_gate) with row j of wo.
  experts     .../ffn/experts/{wi, wi_gate} [E, D, F], wo [E, F, D].
  attention   .../attn/{wq, wk, wv} [D, H*Dh] (head n = columns n*Dh:(n+1)*Dh), wo [H*Dh, D]
              (head n = the same rows).
A layer's groups form scores f32[R, U]: R = 1 for a dense FFN (U = F), attention
(U = H) and whole experts (U = E); per-expert neurons have R = E, U = F, so every expert
keeps the same number of neurons and the compacted experts stay stacked. A group's
score is the L2 norm of its entries (of |w| for magnitude).
"""
from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from sparse_jax.pruning.masking import check_finite, prune_lowest
from sparse_jax.pruning.paths import flatten, path_str

KINDS = ('ffn_neurons', 'heads', 'experts')


@dataclasses.dataclass(frozen=True)
class Member:
  """One leaf of a layer's groups."""
  index: int       # position in the flattened params
  axis: int        # the axis that runs over groups
  size: int        # entries per group along that axis (Dh for heads, else 1)
  batched: bool    # axis 0 is the expert axis and becomes the rows


@dataclasses.dataclass(frozen=True)
class Layer:
  """The groups of one module, e.g. key ('blocks', 0, 'ffn') with U = F neurons."""
  key: tuple
  rows: int
  groups: int
  members: tuple[Member, ...]


def _ffn_layer(key, leaves, kind):
  names = [n for n in ('wi', 'wi_gate', 'wo') if n in leaves]
  shapes = {n: leaves[n][1] for n in names}
  wi, wo = shapes['wi'], shapes['wo']
  if len(wi) not in (2, 3) or len(wo) != len(wi) or wi[-1] != wo[-2] or wi[:-2] != wo[:-2]:
    raise ValueError(f'{path_str(key)}: wi {wi} and wo {wo} are not an FFN pair '
                     '([D, F] and [F, D], or [E, D, F] and [E, F, D]).')
  if kind == 'experts':
    if len(wi) != 3:
      return None
    return Layer(key, 1, wi[0], tuple(Member(leaves[n][0], 0, 1, False) for n in names))
  batched = len(wi) == 3
  axis = {n: (len(wi) - 2 if n == 'wo' else len(wi) - 1) for n in names}
  return Layer(key, wi[0] if batched else 1, wi[-1],
               tuple(Member(leaves[n][0], axis[n], 1, batched) for n in names))


def _attention_layer(key, leaves, num_heads):
  if num_heads is None:
    raise ValueError("kind/structure='heads' needs num_heads (the model's "
                     'model.num_heads).')
  wq, wo = leaves['wq'][1], leaves['wo'][1]
  if len(wq) != 2 or len(wo) != 2 or wq[1] % num_heads or wo[0] != wq[1]:
    raise ValueError(f'{path_str(key)}: wq {wq} / wo {wo} cannot be split into '
                     f'num_heads={num_heads} heads (want wq [D, H*Dh], wo [H*Dh, D]).')
  h = wq[1] // num_heads
  members = [Member(leaves[n][0], 1, h, False) for n in ('wq', 'wk', 'wv')]
  return Layer(key, 1, num_heads, (*members, Member(leaves['wo'][0], 0, h, False)))


def find_layers(paths, shapes, kind: str, num_heads: int | None = None) -> list[Layer]:
  """Every module of the kind: dicts holding wi and wo (FFN / experts) or wq, wk, wv, wo."""
  if kind not in KINDS:
    raise ValueError(f'kind={kind!r} is unknown; use one of {KINDS}.')
  by_parent: dict[tuple, dict] = {}
  for i, (p, s) in enumerate(zip(paths, shapes)):
    if p:
      by_parent.setdefault(p[:-1], {})[p[-1]] = (i, tuple(s))
  layers = []
  for key, leaves in by_parent.items():
    if kind == 'heads' and {'wq', 'wk', 'wv', 'wo'} <= leaves.keys():
      layers.append(_attention_layer(key, leaves, num_heads))
    elif kind != 'heads' and {'wi', 'wo'} <= leaves.keys():
      layer = _ffn_layer(key, leaves, kind)
      if layer is not None:
        layers.append(layer)
  return layers


def _moved_shape(shape, m: Member) -> list:
  moved = list(shape)
  moved.insert(1 if m.batched else 0, moved.pop(m.axis))
  return moved


def to_groups(x, m: Member):
  """A member leaf -> [R, U, entries of one group in this leaf]."""
  x = jnp.moveaxis(x, m.axis, 1 if m.batched else 0)
  rows = x.shape[0] if m.batched else 1
  return x.reshape(rows, (x.shape[1] if m.batched else x.shape[0]) // m.size, -1)


def from_groups(keep, m: Member, shape):
  """bool[R, U] -> the member's element mask, bool[shape]."""
  per_group = math.prod(shape) // (keep.shape[0] * keep.shape[1])
  full = jnp.broadcast_to(keep[:, :, None], (*keep.shape, per_group))
  return jnp.moveaxis(full.reshape(_moved_shape(shape, m)), 1 if m.batched else 0, m.axis)


def layer_scores(elem_scores, layer: Layer):
  """Element scores of the members (same order) -> f32[R, U], the L2 norm per group."""
  sq = sum(jnp.sum(to_groups(x.astype(jnp.float32), m) ** 2, axis=-1)
           for x, m in zip(elem_scores, layer.members))
  return jnp.sqrt(sq)


def layer_masks(keep, layer: Layer, shapes) -> list:
  """bool[R, U] -> one element mask per member."""
  return [from_groups(keep, m, shapes[m.index]) for m in layer.members]


def kept_indices(keep, num_kept: int):
  """bool[R, U] with num_kept True per row -> ascending indices i32[R, num_kept]."""
  return jnp.argsort(~keep, axis=-1, stable=True)[:, :num_kept].astype(jnp.int32)


def group_scores(params, kind: str, num_heads: int | None = None) -> dict:
  """{module path: f32[U] (or f32[E, U] for per-expert neurons)}: L2 norms of the groups."""
  paths, vals, _ = flatten(params)
  out = {}
  for layer in find_layers(paths, [v.shape for v in vals], kind, num_heads):
    sc = layer_scores([vals[m.index] for m in layer.members], layer)
    out[layer.key] = sc if _batched(layer) else sc[0]
  return out


def _batched(layer: Layer) -> bool:
  return layer.members[0].batched


def structured_masks(params, sparsity: float, kind: str, num_heads: int | None = None):
  """Prune round(sparsity * U) lowest-norm groups of every layer of the kind.

  params: nested dict or nnx State of the TransformerLM (or any tree with the layouts
  above). kind: 'ffn_neurons' | 'heads' | 'experts'; 'heads' needs num_heads.
  Returns (masks, kept):
    masks  shaped like params: bool element masks for the layers' leaves (False =
           pruned), None for every other leaf;
    kept   {module path: i32 ascending kept indices}, e.g. ('blocks', 0, 'ffn') ->
           [F'] neurons of wi/wi_gate columns and wo rows; ('blocks', 1, 'ffn',
           'experts') -> [E, F'] per-expert neurons (kind 'ffn_neurons') or [E'] experts
           (kind 'experts'; the router's columns sit at the sibling 'router/kernel');
           ('blocks', 0, 'attn') -> [H'] heads. Gather these to compact the model.
  """
  if not 0 <= sparsity < 1:
    raise ValueError(f'sparsity={sparsity} must be in [0, 1).')
  paths, vals, treedef = flatten(params)
  shapes = [v.shape for v in vals]
  out: list = [None] * len(vals)
  kept = {}
  for layer in find_layers(paths, shapes, kind, num_heads):
    for m in layer.members:
      check_finite(path_str(paths[m.index]), weights=vals[m.index])
    num_pruned = round(sparsity * layer.groups)
    if num_pruned >= layer.groups:
      raise ValueError(f'sparsity={sparsity} prunes all {layer.groups} {kind} of '
                       f'{path_str(layer.key)}; keep at least one: use sparsity below '
                       f'{(layer.groups - 0.5) / layer.groups:.4g}')
    keep = prune_lowest(layer_scores([vals[m.index] for m in layer.members], layer),
                        num_pruned)
    for m, mask in zip(layer.members, layer_masks(keep, layer, shapes)):
      out[m.index] = mask
    idx = kept_indices(keep, layer.groups - num_pruned)
    kept[layer.key] = idx if _batched(layer) else idx[0]
  return treedef.unflatten(out), kept
