"""Where a model's blocks live: unrolled, or a repeating pattern stacked for one scan.

Shape legend: G repeats of the pattern, P its period (blocks per repeat).

Unrolled, block i is at ('blocks', i). Scanned (model.scan_layers), the first `prefix`
blocks stay at ('blocks', i) and block prefix + g*P + j is index g of the leading axis
[G, ...] of every leaf at ('stack', j). The two layouts hold the same numbers, so the
functions below move any state that mirrors the parameters (parameters, optimizer
moments, pruning masks, a checkpoint's leaves) from one to the other.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax.numpy as jnp

UNROLLED, STACKED = 'blocks', 'stack'


@dataclasses.dataclass(frozen=True)
class Pattern:
  prefix: int     # blocks before the stack, unrolled
  period: int     # P
  repeats: int    # G

  def index(self, j: int, g: int) -> int:
    """The block index of position j of repeat g."""
    return self.prefix + g * self.period + j

  def position(self, i: int) -> tuple[int, int]:
    """(j, g) of block i >= prefix."""
    g, j = divmod(i - self.prefix, self.period)
    return j, g


def pattern(kinds: Sequence[Any]) -> Pattern:
  """The layout of blocks of these kinds (one per block, e.g. is-MoE): the prefix and
  period with the fewest distinct blocks to compile (prefix + period), the shorter prefix
  on a tie, such that kinds[prefix:] is the period repeated a whole number of times.
  [dense, MoE] * 3 -> (0, 2, 3); [dense] + [MoE] * 5 -> (1, 1, 5)."""
  kinds, best = list(kinds), None
  for a in range(len(kinds)):
    rest = kinds[a:]
    for p in range(1, len(rest) + 1):
      if len(rest) % p == 0 and all(rest[i] == rest[i % p] for i in range(len(rest))):
        if best is None or a + p < best.prefix + best.period:
          best = Pattern(a, p, len(rest) // p)
        break
  return best or Pattern(0, 1, 0)


def of_spec(spec) -> Pattern:
  """The pattern of a ModelSpec's blocks (dense or MoE)."""
  return pattern([spec.is_moe_block(i) for i in range(spec.num_layers)])


def require_unrolled(spec, what: str) -> None:
  """ValueError for a scanned spec given to code that walks unrolled blocks."""
  if spec.scan_layers:
    raise ValueError(f'{what} works on unrolled blocks and this model is scanned '
                     '(scan_layers=True): pass sparse_jax.models.relayout(model, False), or '
                     'its spec and state with scan_layers=False')


def _find(path: tuple, key: str) -> int | None:
  """The position of `key` followed by an int on the path, or None."""
  for k in range(len(path) - 1):
    if path[k] == key and isinstance(path[k + 1], int):
      return k
  return None


def to_scanned(flat: dict[tuple, Any], pat: Pattern, stack=jnp.stack) -> dict[tuple, Any]:
  """{path: leaf} of the unrolled layout -> the scanned one (stack: list of G leaves -> one)."""
  out, groups = {}, {}
  for path, x in flat.items():
    k = _find(path, UNROLLED)
    if k is None or path[k + 1] < pat.prefix:
      out[path] = x
      continue
    j, g = pat.position(path[k + 1])
    groups.setdefault(path[:k] + (STACKED, j) + path[k + 2:], {})[g] = x
  for path, xs in groups.items():            # a repeat without the leaf gives None
    out[path] = stack([xs.get(g) for g in range(pat.repeats)])
  return out


def to_unrolled(flat: dict[tuple, Any], pat: Pattern,
                take=lambda x, g: x[g]) -> dict[tuple, Any]:
  """{path: leaf} of the scanned layout -> the unrolled one (take(leaf, g): repeat g)."""
  out = {}
  for path, x in flat.items():
    k = _find(path, STACKED)
    if k is None:
      out[path] = x
      continue
    for g in range(pat.repeats):
      out[path[:k] + (UNROLLED, pat.index(path[k + 1], g)) + path[k + 2:]] = take(x, g)
  return out
