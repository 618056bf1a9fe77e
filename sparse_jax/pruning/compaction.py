"""Compaction: structured pruning -> a smaller dense model.

Pruning whole FFN neurons or attention heads only zeroes weights; the model still pays
for them. compact() gathers the kept neurons/heads into smaller arrays and returns the
config of the smaller model. It transforms any nnx State whose paths mirror the model's
parameters (the parameters, Adam's moments, pruning masks), so training can go on with
the optimizer state it had.

Shape legend: D d_model, F d_ff, N heads, H head dim, n kept neurons / heads.
  FFN:       wi, wi_gate [D, F] -> [D, n];  wo [F, D] -> [n, D]
  attention: wq, wk, wv [D, N*H] -> [D, n*H];  wo [N*H, D] -> [n*H, D]
"""
from __future__ import annotations

import copy

import jax.numpy as jnp
import numpy as np
from flax import nnx

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
                     f'config value); got {sorted(counts)}. Prune with a uniform layer '
                     'distribution, not global scope.')
  return counts.pop() if counts else None


def compact(config, state: nnx.State, kept: dict) -> tuple:
  """(new_config, new_state) with only the kept FFN neurons and attention heads.

  kept: {('blocks', i, 'ffn'): neuron indices, ('blocks', i, 'attn'): head indices} for
  the dense blocks (MoE blocks are left as they are). Every dense block of a kind must be
  listed with the same count.
  """
  other = [k for k in kept if len(k) != 3 or k[2] not in ('ffn', 'attn')]
  if other:
    raise ValueError(f'compact() gathers dense FFN neurons and attention heads; it cannot '
                     f'compact {other[0]} (experts stay stacked: prune them in place).')
  m = config.model
  head_dim = m.get('head_dim') or m.d_model // m.num_heads
  n_ffn = _same_count(kept, 'ffn', 'FFN neurons')
  n_heads = _same_count(kept, 'attn', 'heads')
  index = {(b, kind): np.sort(np.asarray(v)) for (_, b, kind), v in kept.items()}
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
  dense_blocks = [i for i in range(m.num_layers) if not _is_moe(config, i)]
  for kind, n in (('ffn', n_ffn), ('attn', n_heads)):
    listed = {b for b, k in index if k == kind}
    if n is not None and listed != set(dense_blocks if kind == 'ffn' else range(m.num_layers)):
      raise ValueError(f"compact(): kept {kind} indices are given for blocks "
                       f'{sorted(listed)}; list every {"dense " if kind == "ffn" else ""}'
                       f'block ({dense_blocks if kind == "ffn" else list(range(m.num_layers))}).')
  new = copy.deepcopy(config)
  if n_ffn is not None:
    new.moe.d_ff = config.moe.d_ff or m.d_ff            # experts keep their width
    new.model.d_ff = n_ffn
  if n_heads is not None:
    new.model.num_heads, new.model.head_dim = n_heads, head_dim
  return new, nnx.from_flat_state(flat)


def _is_moe(config, i):
  from sparse_jax.models import is_moe_block
  return is_moe_block(i, config.moe.num_experts, config.moe.moe_every, config.moe.moe_offset)
