"""One-shot pruning of a trained TransformerLM from calibration tokens, block by block.

Each kernel is pruned by oneshot.py (magnitude, Wanda or SparseGPT) from the inputs it
sees on the calibration tokens, and those inputs come from the blocks below as already
pruned (SparseGPT's and Wanda's sequential scheme); inside a block the attention is pruned
first, so the FFN sees the pruned attention's output:

  attention  each kernel <- its input, from the layer's kernel_inputs (wq, wk, wv <- norm(x);
             wo <- the attention context, heads concatenated)
  dense FFN  wi (wi_gate) <- norm(x');  wo <- the hidden units act(norm(x') @ wi)
  experts    expert e's kernels <- the rows routed to e and kept (their hidden units for
             wo); an expert no calibration token reaches is pruned by magnitude
  shared     as a dense FFN

Shape legend: N calibration rows (tokens), D d_model, F d_ff, E experts.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_jax.layers import DenseFFN, ffn_hidden
from sparse_jax.models import layout, relayout
from sparse_jax.moe import MoE
from sparse_jax.pruning import oneshot
from sparse_jax.pruning.masking import check_finite
from sparse_jax import roles

# A block's calibration forward, compiled once per block structure: op by op, every
# operation of a sharded MoE layer compiles on its own (at repro_expert_pruning.py's
# smoke preset that took 20 s of each 37 s expert pruning).
block_inputs = nnx.jit(lambda block, x: block.inputs(x))
block_output = nnx.jit(lambda block, x: block(x, train=False)[0])

PRUNERS = {'magnitude': oneshot.magnitude, 'wanda': oneshot.wanda,
           'sparsegpt': oneshot.sparsegpt}
METHODS = tuple(PRUNERS)


def prune_model(model, tokens, *, method: str, sparsity: float | None = None,
                n_m: tuple[int, int] | None = None, prunable: Callable | None = None,
                **options) -> dict[tuple, jax.Array]:
  """Prunes the prunable kernels of `model` in place; returns {path: bool mask}.

  tokens i32[B, L]: the calibration batch. method: METHODS; exactly one of sparsity
  (per kernel: see oneshot.py for each method's comparison group) and n_m. options go to
  the method (SparseGPT's block_size, damp). prunable(path, leaf) picks the kernels, with
  the paths of pruning.masks (e.g. ('blocks', 1, 'ffn', 'experts', 'wi')); default the
  attention, FFN and expert kernels the model names (roles.prunable). A scanned model
  (spec.scan_layers) is pruned block by block as its unrolled copy (prunable sees those
  paths) and gets the pruned blocks back; its masks are stacked like its kernels.
  """
  if method not in PRUNERS:
    raise ValueError(f'method={method!r} is unknown; use one of {METHODS}.')
  if model.stack is not None:          # scanned: prune each block of the unrolled copy
    flat = relayout(model, False)
    masks = prune_model(flat, tokens, method=method, sparsity=sparsity, n_m=n_m,
                        prunable=prunable, **options)
    nnx.update(model, nnx.state(relayout(flat, True)))
    # A stacked kernel some blocks left unpruned keeps everything in those blocks.
    return layout.to_scanned(masks, model.pattern, lambda ms: jnp.stack(
        [jnp.ones_like(next(m for m in ms if m is not None)) if m is None else m
         for m in ms]))
  prunable = prunable or roles.prunable(roles.param_roles(model))
  masks = {}

  def prune(path, var, x, index=None):
    """Prune var[...] (or its slice `index`, one expert) from inputs x [N, in]."""
    w = var[...] if index is None else var[...][index]
    if not prunable(path, var[...]):
      return
    check_finite('/'.join(map(str, path)), weights=w, **{'calibration inputs': x})
    fn = PRUNERS[method] if x.shape[0] else oneshot.magnitude
    new, mask = fn(w, x.reshape(-1, x.shape[-1]).astype(jnp.float32), sparsity=sparsity,
                   n_m=n_m, **(options if fn is oneshot.sparsegpt else {}))
    if index is None:
      var[...], masks[path] = new.astype(var[...].dtype), mask
    else:
      var[...] = var[...].at[index].set(new.astype(var[...].dtype))
      masks[path] = masks.get(path, jnp.ones(var[...].shape, bool)).at[index].set(mask)

  def prune_ffn(path, layer: DenseFFN, x):
    for name in layer.weights():
      if name != 'wo':
        prune(path + (name,), getattr(layer, name), x)
    prune(path + ('wo',), layer.wo, ffn_hidden(layer.weights(), x, layer.activation))

  x = jnp.take(model.embed[...], tokens, axis=0).astype(model.dtype)     # [B, L, D]
  for i, block in enumerate(model.blocks):
    at = ('blocks', i)
    a = block_inputs(block, x)[0]
    for name, inputs in block.attn.kernel_inputs(a).items():
      prune(at + ('attn', name), getattr(block.attn, name), inputs())
    h = block_inputs(block, x)[2]                    # after the pruned attention
    rows = h.reshape(-1, h.shape[-1])                                    # [N, D]
    if isinstance(block.ffn, MoE):
      moe = block.ffn
      plan, _ = moe.route(h)
      expert = np.asarray(jnp.where(plan.kept, plan.expert, -1)).reshape(rows.shape[0], -1)
      for e in range(moe.num_experts):
        xe = rows[np.flatnonzero((expert == e).any(axis=1))]             # [N_e, D]
        w = {n: v[e] for n, v in moe.experts.weights().items()}
        for name in w:
          if name != 'wo':
            prune(at + ('ffn', 'experts', name), getattr(moe.experts, name), xe, e)
        w = {n: v[e] for n, v in moe.experts.weights().items()}
        prune(at + ('ffn', 'experts', 'wo'), moe.experts.wo,
              ffn_hidden(w, xe, moe.experts.activation), e)
      if moe.shared is not None:
        prune_ffn(at + ('ffn', 'shared'), moe.shared, rows)
    else:
      prune_ffn(at + ('ffn',), block.ffn, rows)
    x = block_output(block, x)                       # the next block sees this one pruned
  return masks
