"""Honest accounting of parameters and FLOPs per token, in two views of one count:

  params_from_config(spec) / flops_from_config(spec, seq_len)
      from a ModelSpec, before any model exists (the trainer's banner, experiment design);
  params_from_model(model, masks) / flops_from_model(model, seq_len)
      from a model's own parameters, so pruned or compacted models count as they are,
      with per-part breakdowns and non-zero counts.

"Active per token" counts, in each MoE block, the K experts a token uses plus the router
(and the shared expert); embeddings are reported separately because they cost a lookup,
not a matmul. FLOPs are multiply-adds x 2; attention scores count the full L x L product
(what the XLA kernel computes), not the causal half. Tests hold the two views equal.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sparse_jax import roles
from sparse_jax.layers import Attention
from sparse_jax.mla import LatentAttention
from sparse_jax.models import relayout
from sparse_jax.moe import MoE
from sparse_jax.pruning.paths import plain_path
from sparse_jax.specs import ModelSpec


# ---------------------------------------------------------------------- from a spec

def _ffn_params(d, f, activation):
  return d * f * (3 if activation == 'swiglu' else 2)


def _vectors(spec: ModelSpec) -> int:
  """Parameters of a block that are no matmul weight: its norms, q/k norms, biases."""
  if spec.kv_lora_rank:                                    # the latents' norms
    return 2 * spec.d_model + spec.q_lora_rank + spec.kv_lora_rank
  q, kv = spec.num_heads * spec.head_dim, spec.kv_heads * spec.head_dim
  qk_norm = {'none': 0, 'head': 2 * spec.head_dim, 'proj': q + kv}[spec.qk_norm]
  return 2 * spec.d_model + qk_norm + (q + 2 * kv if spec.qkv_bias else 0)


def _attention_weights(spec: ModelSpec) -> int:
  """The matmul weights of one attention layer."""
  d, h = spec.d_model, spec.num_heads
  if spec.kv_lora_rank:
    qk = h * (spec.qk_nope_head_dim + spec.qk_rope_head_dim)
    q = spec.q_lora_rank * (d + qk) if spec.q_lora_rank else d * qk
    kv = d * (spec.kv_lora_rank + spec.qk_rope_head_dim) + spec.kv_lora_rank * h * (
        spec.qk_nope_head_dim + spec.v_head_dim)
    return q + kv + h * spec.v_head_dim * d
  return 2 * d * h * spec.head_dim + 2 * d * spec.kv_heads * spec.head_dim


def _score_width(spec: ModelSpec) -> int:
  """Channels per token that QK^T and AV multiply: H * (qk head dim + v head dim)."""
  if spec.kv_lora_rank:
    return spec.num_heads * (spec.qk_nope_head_dim + spec.qk_rope_head_dim + spec.v_head_dim)
  return 2 * spec.num_heads * spec.head_dim


def params_from_config(spec: ModelSpec) -> dict[str, int]:
  """{'total', 'active', 'embedding', 'expert'}: totals over the whole model; 'active' is
  per token, embeddings excluded from both 'total' and 'active'."""
  d = spec.d_model
  embedding = spec.vocab_size * d * (1 if spec.tie_embeddings else 2)
  total = active = d                                                   # final norm
  expert = 0
  for i in range(spec.num_layers):
    block = _attention_weights(spec) + _vectors(spec)
    total, active = total + block, active + block
    if spec.is_moe_block(i):
      moe = spec.moe
      one = _ffn_params(d, moe.d_ff, spec.activation)
      shared = _ffn_params(d, moe.shared_d_ff, spec.activation) + (d if moe.shared_gate else 0)
      router = d * moe.num_experts
      expert += moe.num_experts * one
      total += moe.num_experts * one + shared + router
      active += moe.k * one + shared + router
    else:
      ffn = _ffn_params(d, spec.d_ff, spec.activation)
      total, active = total + ffn, active + ffn
  return {'total': total, 'active': active, 'embedding': embedding, 'expert': expert}


def flops_from_config(spec: ModelSpec, seq_len: int) -> dict[str, float]:
  """Forward and training (3x forward) FLOPs per token, active experts only."""
  c = params_from_config(spec)
  # Norm scales and biases are not matmul weights; the output projection is.
  matmul = (c['active'] - spec.num_layers * _vectors(spec) - spec.d_model
            + spec.vocab_size * spec.d_model)
  attention = spec.num_layers * 2 * seq_len * _score_width(spec)        # QK^T, AV
  forward = 2 * matmul + attention
  return {'forward': float(forward), 'train': 3.0 * forward}


# --------------------------------------------------------------------- from a model

def _paths(tree) -> dict[tuple, object]:
  """{path of keys from the root: leaf}; a Variable's trailing 'value' is dropped and
  None leaves are kept (masks use None for leaves that are not pruned)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)
  return {plain_path(path): leaf for path, leaf in flat}


def _param_table(model):
  """[(path, array, kind, active share (k, E) or 1)] for every nnx.Param of the model.

  kind: embedding | attention | ffn | router | experts | shared | norm | other, from the
  model's parameter roles (the shared expert's gate counts as 'shared').
  """
  moes = {p: n for p, n in nnx.iter_graph(model) if isinstance(n, MoE)}
  param_roles = roles.param_roles(model)
  rows = []
  for path, leaf in _paths(nnx.state(model, nnx.Param)).items():
    kind = {'expert': 'experts', 'gate': 'shared'}.get(param_roles[path].kind,
                                                        param_roles[path].kind)
    share = (1, 1)
    if kind == 'experts':        # stacked [E, ...] of the MoE holding it: a token uses K
      moe = next(moes[path[:n]] for n in range(len(path) - 1, -1, -1) if path[:n] in moes)
      share = (moe.settings.k, moe.num_experts)
    rows.append((path, leaf, kind, share))
  return rows


def params_from_model(model, masks=None) -> dict:
  """Parameter counts of a model's nnx.Params (router biases and other state excluded).

  masks: optional pytree shaped like nnx.state(model, nnx.Param) with bool arrays (True
  = kept) or None (leaf not pruned), e.g. sparse_jax.pruning.masks(opt_state).
  Returns ints except where noted:
    total, active      all parameters, and those one token uses: an MoE block counts
                       K of its E experts, its router and its shared expert; embeddings
                       are excluded from both (they cost a lookup, not a matmul), as in
                       params_from_config (expert choice: K is the layer's
                       k; there a token gets capacity_factor * k experts on average)
    embedding          embed (+ unembed when untied)
    expert, router     routed-expert parameters (all E) and router kernels
    nonzero, active_nonzero, embedding_nonzero   the same counting only entries != 0
                       (exact zeros, e.g. pruned weights); active_nonzero (float) counts
                       K/E of each MoE block's non-zero expert entries: the mean expert
    mask_nonzero, mask_active_nonzero, embedding_mask_nonzero   with masks: entries
                       the masks keep (a None or absent mask keeps the whole leaf)
    by_kind            {kind: {'total', 'active', 'nonzero'}} over the kinds attention,
                       ffn, router, experts, shared, norm, embedding, other
  """
  mask = {} if masks is None else {p: m for p, m in _paths(masks).items() if m is not None}
  table = _param_table(model)
  known = {p for p, *_ in table}
  if unknown := sorted(map(str, set(mask) - known)):
    raise ValueError(f'masks have leaves the model lacks: {", ".join(unknown)}.')
  out = dict.fromkeys(('total', 'active', 'embedding', 'expert', 'router', 'nonzero',
                       'active_nonzero', 'embedding_nonzero'), 0)
  if masks is not None:
    out.update(mask_nonzero=0, mask_active_nonzero=0, embedding_mask_nonzero=0)
  by_kind = {}
  for path, leaf, kind, (k, e) in table:
    size, nz = leaf.size, int(jnp.count_nonzero(leaf))
    if path in mask and tuple(mask[path].shape) != tuple(leaf.shape):
      raise ValueError(f'mask {path} has shape {tuple(mask[path].shape)}; the parameter '
                       f'has {tuple(leaf.shape)}.')
    kept = int(jnp.count_nonzero(mask[path])) if path in mask else size
    b = by_kind.setdefault(kind, {'total': 0, 'active': 0, 'nonzero': 0})
    b['total'] += size
    b['nonzero'] += nz
    if kind == 'embedding':
      out['embedding'] += size
      out['embedding_nonzero'] += nz
      if masks is not None:
        out['embedding_mask_nonzero'] += kept
      continue
    b['active'] += size * k // e
    out['total'] += size
    out['active'] += size * k // e
    out['nonzero'] += nz
    out['active_nonzero'] += nz * k / e
    out['expert'] += size if kind == 'experts' else 0
    out['router'] += size if kind == 'router' else 0
    if masks is not None:
      out['mask_nonzero'] += kept
      out['mask_active_nonzero'] += kept * k / e
  out['by_kind'] = by_kind
  return out


# ------------------------------------------------------------------ FLOP accounting

def flops_from_model(model, seq_len: int) -> dict[str, float]:
  """Forward FLOPs per token of a TransformerLM, by part, from its parameters.

  A matmul with a [in, out] weight costs 2*in*out per token (multiply and add); only the
  K routed experts a token uses count, plus the router and any shared expert. Attention
  scores (QK^T and AV) cost 4*seq_len*D per token and layer: the full L x L product the
  XLA kernel computes, not the causal half. Norms, activations, softmax, RoPE, routing
  bookkeeping and the embedding lookup are not counted (O(D + F) per token against
  O(D * F) for the matmuls). Agrees exactly with flops_from_config.

  Returns attention_proj, attention_scores, ffn, experts, shared, router, output,
  other (2x any other matmul weight), forward (their sum), train (3x forward: the
  backward pass costs two forwards), and forward_nonzero: the forward with every
  weight matrix counted by its non-zero entries (what a sparse kernel could skip to;
  experts at K/E of their non-zeros), attention scores unchanged.
  """
  model = relayout(model, False)        # counted per block
  parts = dict.fromkeys(('attention_proj', 'attention_scores', 'ffn', 'experts', 'shared',
                         'router', 'output', 'other'), 0.0)
  nonzero = 0.0
  names = {'attention': 'attention_proj', 'ffn': 'ffn', 'experts': 'experts',
           'shared': 'shared', 'router': 'router', 'other': 'other'}
  for path, leaf, kind, (k, e) in _param_table(model):
    if kind == 'embedding':   # the lookup is free; the output projection is a matmul
      if path == ('unembed',) or getattr(model, 'unembed', None) is None:
        parts['output'] += 2.0 * leaf.size
        nonzero += 2.0 * int(jnp.count_nonzero(leaf))
      continue
    if kind == 'norm' or leaf.ndim < 2:
      continue
    parts[names[kind]] += 2.0 * leaf.size * k / e
    nonzero += 2.0 * int(jnp.count_nonzero(leaf)) * k / e
  for _, node in nnx.iter_graph(model):
    if isinstance(node, Attention):
      parts['attention_scores'] += 2.0 * 2 * seq_len * node.wq.shape[-1]
    elif isinstance(node, LatentAttention):
      dn, dr, dv = node.dims
      parts['attention_scores'] += 2.0 * seq_len * node.num_heads * (dn + dr + dv)
  forward = sum(parts.values())
  return {**parts, 'forward': forward, 'train': 3.0 * forward,
          'forward_nonzero': nonzero + parts['attention_scores']}
