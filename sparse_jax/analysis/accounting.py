"""Analytic parameter and FLOP counts of the transformer LM, from its config.

"Active per token" counts, in each MoE block, the K experts a token uses plus the router
(and the shared expert); embeddings are reported separately because they cost a lookup,
not a matmul. FLOPs are multiply-adds x 2; attention scores count the full L x L product
(what the XLA kernel computes), not the causal half.
"""
from __future__ import annotations

from sparse_jax.models.transformer import is_moe_block


def _ffn_params(d, f, activation):
  return d * f * (3 if activation == 'swiglu' else 2)


def count_params(config) -> dict[str, int]:
  """{'total', 'active', 'embedding', 'expert'}: totals over the whole model; 'active' is
  per token, embeddings excluded from both 'total' and 'active'."""
  m, moe = config.model, config.moe
  d = m.d_model
  embedding = m.vocab_size * d * (1 if m.tie_embeddings else 2)
  total = active = d                                                   # final norm
  expert = 0
  for i in range(m.num_layers):
    inner = m.num_heads * (m.get('head_dim') or d // m.num_heads)
    block = 4 * d * inner + 2 * d                                      # attention + norms
    total, active = total + block, active + block
    if is_moe_block(i, moe.num_experts, moe.moe_every, moe.moe_offset):
      one = _ffn_params(d, moe.d_ff or m.d_ff, m.activation)
      shared = _ffn_params(d, moe.shared_d_ff, m.activation) if moe.shared_d_ff else 0
      router = d * moe.num_experts
      expert += moe.num_experts * one
      total += moe.num_experts * one + shared + router
      active += moe.k * one + shared + router
    else:
      ffn = _ffn_params(d, m.d_ff, m.activation)
      total, active = total + ffn, active + ffn
  return {'total': total, 'active': active, 'embedding': embedding, 'expert': expert}


def flops_per_token(config, seq_len: int | None = None) -> dict[str, float]:
  """Forward and training (3x forward) FLOPs per token, active experts only."""
  m = config.model
  seq_len = seq_len or config.train.seq_len
  c = count_params(config)
  # Norm scales are not matmul weights; the output projection is.
  matmul = c['active'] - (2 * m.num_layers + 1) * m.d_model + m.vocab_size * m.d_model
  inner = m.num_heads * (m.get('head_dim') or m.d_model // m.num_heads)
  attention = m.num_layers * 2 * 2 * seq_len * inner                  # QK^T and AV
  forward = 2 * matmul + attention
  return {'forward': float(forward), 'train': 3.0 * forward}
