"""Expert pruning for MoE layers: score the experts on calibration tokens, keep the best
`keep` of every MoE layer, and (optionally) merge each removed expert into its most
similar kept one. compaction.compact_experts then builds the smaller layer.

Scores (higher = keep), per MoE layer, from the kept routing choices of the calibration
tokens as they flow through the model:
  'frequency'  the share of the choices that go to the expert
  'reap'       REAP (2025): the mean, over the choices that go to the expert, of gate
               weight x ||expert output||_2 (an expert that is chosen often but adds
               little scores low)
  'reconstruction'  how far the layer's output moves when the expert alone is removed
               (its router column at -inf, the tokens rerouted as the layer routes them):
               mean ||y - y_without_e||^2 / mean ||y||^2 over the calibration rows. One
               expert at a time, not the joint search over subsets of Lu et al. (2024)
Shape legend: N calibration rows, D d_model, E experts, K choices per token.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_jax.layers import ffn
from sparse_jax.models import layout, relayout
from sparse_jax.moe import MoE
from sparse_jax.pruning.masking import check_finite
from sparse_jax.pruning.post_training import block_inputs, block_output

SCORES = ('frequency', 'reap', 'reconstruction')


class MaskedRouter(nnx.Module):
  """`router` with the logits of the `removed` experts (bool[E]) at -inf: the layer then
  routes as if they were gone, which is what compaction.compact_experts builds."""

  def __init__(self, router, removed):
    self.router = router
    self.removed = nnx.Variable(jnp.asarray(removed, bool))

  @property
  def bias(self):                                  # read by loss-free balancing
    return self.router.bias

  def __call__(self, x, *, train: bool = False):
    return jnp.where(self.removed[...], -jnp.inf, self.router(x, train=train))


def _reconstruction(moe: MoE, h) -> np.ndarray:
  """f64[E]: mean ||y - y_without_e||^2 / mean ||y||^2 of the layer on h [B, L, D]."""
  router, e_all = moe.router, moe.num_experts
  moe.router = masked = MaskedRouter(router, np.zeros(e_all, bool))
  forward = nnx.jit(lambda m, h: m(h)[0])
  try:
    outputs = []
    for removed in [None, *range(e_all)]:
      masked.removed[...] = jnp.arange(e_all) == (-1 if removed is None else removed)
      outputs.append(np.asarray(forward(moe, h), np.float64).reshape(-1, h.shape[-1]))
  finally:
    moe.router = router
  y, *without = outputs
  return np.array([np.mean(np.sum((y - w) ** 2, -1)) for w in without]) / np.mean(
      np.sum(y ** 2, -1))


def moe_inputs(model, tokens):
  """{block index: (MoE layer, its input h [B, L, D])} on the calibration tokens."""
  out = {}
  model = relayout(model, False)
  x = jnp.take(model.embed[...], tokens, axis=0).astype(model.dtype)
  for i, block in enumerate(model.blocks):
    if isinstance(block.ffn, MoE):
      out[i] = (block.ffn, block_inputs(block, x)[2])
    x = block_output(block, x)
  return out


def expert_scores(model, tokens, score: str) -> dict[int, np.ndarray]:
  """{MoE block index: f64[E] scores} of `model` on calibration tokens i32[B, L]."""
  if score not in SCORES:
    raise ValueError(f'score={score!r} is unknown; use one of {SCORES}.')
  out = {}
  for i, (moe, h) in moe_inputs(model, tokens).items():
    kernel = getattr(moe.router, 'kernel', None)
    check_finite(f'blocks/{i}/ffn', **{'calibration inputs': h, 'router weights':
                                        None if kernel is None else kernel[...]},
                 **{f'expert weights {n}': v for n, v in moe.experts.weights().items()})
    if score == 'reconstruction':
      out[i] = _reconstruction(moe, h)
      continue
    plan, _ = moe.route(h)
    rows = np.asarray(h.reshape(-1, h.shape[-1]))                       # [N, D]
    expert = np.asarray(jnp.where(plan.kept, plan.expert, -1)).reshape(rows.shape[0], -1)
    gate = np.asarray(plan.weight, np.float64).reshape(rows.shape[0], -1)
    e_all = moe.num_experts
    if score == 'frequency':
      counts = np.bincount(expert[expert >= 0], minlength=e_all)
      out[i] = counts / max(counts.sum(), 1)
      continue
    w = moe.experts.weights()
    s = np.zeros(e_all)
    for e in range(e_all):
      tok, slot = np.nonzero(expert == e)
      if tok.size:
        y = ffn({n: v[e] for n, v in w.items()}, jnp.asarray(rows[tok]), moe.experts.activation)
        s[e] = np.mean(gate[tok, slot] * np.linalg.norm(np.asarray(y, np.float64), axis=-1))
    out[i] = s
  return out


def choose(scores: dict[int, np.ndarray], keep: int, k: int) -> dict[int, np.ndarray]:
  """{block: the `keep` highest-scoring expert indices, ascending}; ties keep the lower
  index. keep must be in [k, E)."""
  for i, s in scores.items():
    if not k <= keep < len(s):
      raise ValueError(f'keep={keep} must be at least k={k} (each token picks k experts) '
                       f'and below the {len(s)} experts of MoE block {i}.')
  return {i: np.sort(np.argsort(-s, kind='stable')[:keep]) for i, s in scores.items()}


def merge_into_kept(model, kept: dict[int, np.ndarray], weights: dict[int, np.ndarray]):
  """Merge each removed expert into its most similar kept one (cosine similarity of the
  experts' concatenated weights), in place: the kept expert becomes the average of the
  two weighted by `weights` (e.g. routing frequency). The removed experts are left as they
  are; compaction drops them. `model` is unrolled (relayout(model, False))."""
  layout.require_unrolled(model.spec, 'merge_into_kept')
  for i, keep in kept.items():
    experts = model.blocks[i].ffn.experts
    w = experts.weights()
    flat = np.concatenate([np.asarray(v).reshape(v.shape[0], -1) for v in w.values()], 1)
    unit = flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)
    mass = np.asarray(weights[i], np.float64).copy()
    for r in sorted(set(range(len(flat))) - set(keep.tolist())):
      into = keep[np.argmax(unit[keep] @ unit[r])]
      total = mass[into] + mass[r]
      a, b = (0.5, 0.5) if total <= 0 else (mass[into] / total, mass[r] / total)
      for name, v in w.items():
        var = getattr(experts, name)
        var[...] = var[...].at[into].set((a * var[...][into] + b * var[...][r]).astype(v.dtype))
      mass[into] = total
