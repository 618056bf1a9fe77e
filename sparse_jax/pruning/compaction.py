"""Compaction: structured pruning -> a smaller dense model.

Pruning whole FFN neurons or attention heads only zeroes weights; the model still pays
for them. compact() gathers the kept neurons/heads into smaller arrays and returns the
ModelSpec of the smaller model. It transforms any nnx State whose paths mirror the model's
parameters (the parameters, Adam's moments, pruning masks), so training can go on with
the optimizer state it had.

compact_experts() does the same for whole experts of MoE layers: their stacked weights,
router columns and loss-free biases.

Shape legend: D d_model, F d_ff, H heads, Dh head dim, n kept neurons / heads / experts.
  FFN:       wi, wi_gate [D, F] -> [D, n];  wo [F, D] -> [n, D]
  attention: wq, wk, wv [D, H*Dh] -> [D, n*Dh];  wo [H*Dh, D] -> [n*Dh, D]
  experts:   wi, wi_gate, wo [E, ...] -> [n, ...];  router kernel [D, E] -> [D, n];
             router bias [E] -> [n]
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_jax.models import layout

_FFN_IN, _ATTN_IN = ('wi', 'wi_gate'), ('wq', 'wk', 'wv')


def _locate(path):
  """(block index, 'ffn' | 'attn', leaf name) for a dense FFN or attention leaf."""
  for j in range(len(path) - 3):
    if path[j] == 'blocks' and path[j + 2] in ('ffn', 'attn') and isinstance(path[j + 3], str):
      return path[j + 1], path[j + 2], path[j + 3]
  return None


def _same_count(kept, kind, what):
  counts = {len(v) for (_, _, k), v in kept.items() if k == kind}
  if len(counts) > 1:
    raise ValueError(f'compact() needs the same number of kept {what} in every block (one '
                     f'spec value); got {sorted(counts)}. Prune with a uniform layer '
                     'distribution, not global scope.')
  return counts.pop() if counts else None


def check_kept(where: str, indices, size: int, what: str) -> np.ndarray:
  """The kept indices as a sorted int array; ValueError unless they are integers in
  [0, size), unique, and at least one."""
  idx = np.asarray(indices)
  if idx.ndim != 1 or not (idx.size == 0 or np.issubdtype(idx.dtype, np.integer)):
    raise ValueError(f'kept {what} of {where} must be a 1-D list of integer indices; got '
                     f'{np.asarray(indices).tolist()!r}')
  if idx.size == 0:
    raise ValueError(f'kept {what} of {where} is empty: a block needs at least one of its '
                     f'{size} {what}; keep one or more (prune at a lower sparsity)')
  outside = idx[(idx < 0) | (idx >= size)]
  if outside.size:
    raise ValueError(f'kept {what} of {where}: index {int(outside[0])} is outside [0, {size})')
  if np.unique(idx).size != idx.size:
    values, counts = np.unique(idx, return_counts=True)
    raise ValueError(f'kept {what} of {where}: index {int(values[counts > 1][0])} is listed '
                     'more than once; give each index once')
  return np.sort(idx)


def compact(spec, state: nnx.State, kept: dict) -> tuple:
  """(new_spec, new_state) with only the kept FFN neurons and attention heads.

  spec: the model's sparse_jax.config.ModelSpec; new_spec is the smaller model's.

  kept: {('blocks', i, 'ffn'): neuron indices, ('blocks', i, 'attn'): head indices} for
  the dense blocks (MoE blocks are left as they are). Every dense block of a kind must be
  listed with the same count.
  """
  layout.require_unrolled(spec, 'compact()')
  other = [k for k in kept if len(k) != 3 or k[2] not in ('ffn', 'attn')]
  if other:
    raise ValueError(f'compact() gathers dense FFN neurons and attention heads; it cannot '
                     f'compact {other[0]} (for whole experts use compact_experts).')
  head_dim = spec.head_dim
  n_ffn = _same_count(kept, 'ffn', 'FFN neurons')
  n_heads = _same_count(kept, 'attn', 'heads')
  size = {'ffn': (spec.d_ff, 'FFN neurons'), 'attn': (spec.num_heads, 'heads')}
  index = {(b, kind): check_kept(f'blocks/{b}/{kind}', v, *size[kind])
           for (_, b, kind), v in kept.items()}
  flat = []
  for path, var in nnx.to_flat_state(state):
    where = _locate(path)
    is_var = isinstance(var, nnx.Variable)
    value = var[...] if is_var else var
    if where is not None and (where[0], where[1]) in index:
      block, kind, name = where
      idx = index[(block, kind)]
      if kind == 'attn':
        idx = (idx[:, None] * head_dim + np.arange(head_dim)).reshape(-1)
      axis = 1 if name in _FFN_IN + _ATTN_IN else 0
      if value.ndim == 2:                               # skip scalars of optimizer state
        value = jnp.take(value, jnp.asarray(idx), axis=axis)
    flat.append((path, var.replace(value) if is_var else value))
  dense_blocks = [i for i in range(spec.num_layers) if not spec.is_moe_block(i)]
  for kind, n in (('ffn', n_ffn), ('attn', n_heads)):
    listed = {b for b, k in index if k == kind}
    if n is not None and listed != set(dense_blocks if kind == 'ffn' else range(spec.num_layers)):
      raise ValueError(f"compact(): kept {kind} indices are given for blocks "
                       f'{sorted(listed)}; list every {"dense " if kind == "ffn" else ""}'
                       f'block ({dense_blocks if kind == "ffn" else list(range(spec.num_layers))}).')
  new = spec
  if n_ffn is not None:                                 # experts keep their own width
    new = dataclasses.replace(new, d_ff=n_ffn)
  if n_heads is not None:
    new = dataclasses.replace(new, num_heads=n_heads)
  return new, nnx.from_flat_state(flat)


def _expert_leaf(path):
  """(block index, axis of the expert dimension) for an expert or router leaf, else None."""
  for j in range(len(path) - 4):
    if path[j] == 'blocks' and path[j + 2] == 'ffn':
      part, name = path[j + 3], path[j + 4]
      if part == 'experts':
        return path[j + 1], 0
      if part == 'router':
        return path[j + 1], 1 if name == 'kernel' else 0
  return None


def compact_experts(state: nnx.State, kept: dict) -> nnx.State:
  """`state` with only the kept experts of each MoE block: {block index: expert indices}
  (ascending; every MoE block listed with the same count, one spec value). Works on any
  nnx State whose paths mirror the model's (parameters, Adam's moments, masks, the
  (model, optimizer) state of a run). The smaller layer routes over the kept experts
  only: it equals the original with the removed experts' router logits at -inf, given
  the same capacity per expert (scale capacity_factor by n / E)."""
  if any(layout.STACKED in path for path, _ in nnx.to_flat_state(state)):
    raise ValueError('compact_experts() works on unrolled blocks and this state is scanned: '
                     'compact the state of sparse_jax.models.relayout(model, False)')
  if len({len(v) for v in kept.values()}) > 1:
    raise ValueError(f'compact_experts() needs the same number of kept experts in every '
                     f'MoE block (one spec value); got { {i: len(v) for i, v in kept.items()} }.')
  flat_state = nnx.to_flat_state(state)
  experts = {}          # block -> E, from the router kernel [D, E] or an expert stack
  for path, var in flat_state:
    where = _expert_leaf(path)
    value = var[...] if isinstance(var, nnx.Variable) else var
    if where is not None and getattr(value, 'ndim', 0) >= 2:
      experts.setdefault(where[0], value.shape[where[1]])
  missing = sorted(set(kept) - set(experts))
  if missing:
    raise ValueError(f'compact_experts(): block {missing[0]} has no MoE layer; MoE blocks '
                     f'are {sorted(experts)}')
  index = {i: jnp.asarray(check_kept(f'blocks/{i}/ffn', v, experts[i], 'experts'))
           for i, v in kept.items()}
  flat = []
  for path, var in flat_state:
    where = _expert_leaf(path)
    is_var = isinstance(var, nnx.Variable)
    value = var[...] if is_var else var
    if where is not None and where[0] in index and getattr(value, 'ndim', 0) > where[1]:
      value = jnp.take(value, index[where[0]], axis=where[1])
    flat.append((path, var.replace(value) if is_var else value))
  return nnx.from_flat_state(flat)
