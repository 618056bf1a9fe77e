"""Units: the leaves one mask decision covers, viewed as scores [R, U].

Shape legend: R rows pruned independently, U candidates (units) per row, M group size of N:M.
  element     one leaf, R = 1, U = its size (unstructured pruning; experts share one row);
              a scanned stack [G, ...] has R = G, a row per layer
  n_m         one leaf, R = size / M, U = M (runs of M along the input axis)
  structured  a structured.Layer: several leaves, U neurons / heads / experts per row
  rows        one leaf as dynamic.py's rows: R = E (or 1), U = in * out, or with a
              constant fan-in R = E * out, U = in (dynamic sparse training)
A unit maps the members' element scores to f32[R, U] and a keep mask bool[R, U] back to
one element mask per member.
"""
from __future__ import annotations

import dataclasses
import math

from sparse_jax.pruning import dynamic
from sparse_jax.pruning import masking as mask_lib
from sparse_jax.pruning import structured
from sparse_jax.pruning.paths import path_str


@dataclasses.dataclass(frozen=True)
class Unit:
  leaves: tuple[int, ...]            # indices into the flattened params
  rows: int
  groups: int
  kind: str                          # 'element' | 'n_m' | 'structured' | 'rows'
  m: int = 0                         # N:M group size
  layer: structured.Layer | None = None
  fan_in: str = 'any'                # rows: dynamic.FAN_IN

  def scores(self, xs):
    """Element scores of self.leaves (same order) -> f32[R, U]."""
    if self.kind == 'element':
      return xs[0].reshape(self.rows, -1)
    if self.kind == 'n_m':
      return mask_lib.to_n_m_groups(xs[0], self.m)
    if self.kind == 'rows':
      return dynamic.to_rows(xs[0], self.fan_in)
    return structured.layer_scores(xs, self.layer)

  def masks(self, keep, shapes) -> list:
    """bool[R, U] -> element masks of self.leaves. shapes: all leaf shapes."""
    if self.kind == 'element':
      return [keep.reshape(shapes[self.leaves[0]])]
    if self.kind == 'n_m':
      return [mask_lib.from_n_m_groups(keep, shapes[self.leaves[0]])]
    if self.kind == 'rows':
      return [dynamic.from_rows(keep, shapes[self.leaves[0]], self.fan_in)]
    return structured.layer_masks(keep, self.layer, shapes)


def element_units(indices, shapes, stacked=None) -> list[Unit]:
  """One unit per leaf; a stacked leaf [G, ...] (stacked[k] for indices[k]) has a row per
  layer."""
  stacked = stacked or [False] * len(indices)
  rows = [shapes[i][0] if s else 1 for i, s in zip(indices, stacked)]
  return [Unit((i,), r, math.prod(shapes[i]) // r, 'element') for i, r in zip(indices, rows)]


def n_m_units(indices, paths, shapes, n: int, m: int) -> list[Unit]:
  units = []
  for i in indices:
    shape = tuple(shapes[i])
    ax = mask_lib.input_axis(len(shape))
    if not shape or shape[ax] % m:
      raise ValueError(f'n_m=({n}, {m}): leaf {path_str(paths[i])} has shape {shape}; its '
                       f'input axis (axis {ax}) is not divisible by M={m}. Exclude it '
                       'with prunable= or pick an M that divides it.')
    size = math.prod(shape)
    units.append(Unit((i,), size // m, m, 'n_m', m=m))
  return units


def row_units(indices, paths, shapes, fan_in: str) -> list[Unit]:
  units = []
  for i in indices:
    if len(shapes[i]) < 2:
      raise ValueError(f'dynamic sparsity: leaf {path_str(paths[i])} has shape {shapes[i]}, '
                       'not a kernel [in, out] or [E, in, out]; exclude it with prunable=.')
    rows, groups = dynamic.rows_shape(shapes[i], fan_in)
    units.append(Unit((i,), rows, groups, 'rows', fan_in=fan_in))
  return units


def structured_units(indices, paths, shapes, kind: str, num_heads) -> list[Unit]:
  """Layers of the kind whose member leaves are all prunable."""
  allowed = set(indices)
  return [Unit(tuple(mb.index for mb in layer.members), layer.rows, layer.groups,
               'structured', layer=layer)
          for layer in structured.find_layers(paths, shapes, kind, num_heads)
          if all(mb.index in allowed for mb in layer.members)]
