"""Decoder-only transformer LM whose FFN per block is dense or MoE.

Shape legend: B batch, L length, D d_model, V vocab.
Pre-norm blocks: x += attn(norm(x)); x += ffn(norm(x)). Which blocks are MoE:
ModelSpec.is_moe_block.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from sparse_jax.config import ModelSpec
from sparse_jax.layers import Attention, DenseFFN, RMSNorm
from sparse_jax.moe import MoE


class FFNInput(nnx.Intermediate):
  """The normed input of a block's FFN, sown when the block's `sow_ffn_input` is set
  (what sparse_jax.analysis.activations reads)."""


class Block(nnx.Module):
  def __init__(self, spec: ModelSpec, *, use_moe: bool, causal: bool, mesh: Mesh | None,
               rngs: nnx.Rngs):
    d, dtype = spec.d_model, jnp.dtype(spec.param_dtype)
    self.sow_ffn_input = False
    self.attn_norm, self.ffn_norm = RMSNorm(d), RMSNorm(d)
    self.attn = Attention(d, spec.num_heads, head_dim=spec.head_dim,
                          init_scale=spec.init_scale, param_dtype=dtype, mesh=mesh, rngs=rngs)
    if use_moe:
      self.ffn = MoE(d, spec.moe.d_ff, spec.moe.num_experts, activation=spec.activation,
                     causal=causal, param_dtype=dtype, mesh=mesh, rngs=rngs,
                     **spec.moe.layer_kwargs())
    else:
      self.ffn = DenseFFN(d, spec.d_ff, activation=spec.activation,
                          init_scale=spec.init_scale, param_dtype=dtype, mesh=mesh,
                          rngs=rngs)

  def __call__(self, x, train: bool):
    x = x + self.attn(self.attn_norm(x))
    h = self.ffn_norm(x)
    if self.sow_ffn_input:
      self.sow(FFNInput, 'ffn_input', h)
    if isinstance(self.ffn, MoE):
      y, aux = self.ffn(h, train=train)
      return x + y, aux
    return x + self.ffn(h), None


class TransformerLM(nnx.Module):
  """tokens i32[B, L] -> (logits f32[B, L, V], aux).

  aux: 'load_balance_loss' and 'router_z_loss' summed over the MoE blocks (0 for a dense
  model), and 'layers': {block index: that block's routing metrics}.
  """

  def __init__(self, spec: ModelSpec, *, mesh: Mesh | None = None, rngs: nnx.Rngs,
               causal: bool = True):
    d, v = spec.d_model, spec.vocab_size
    self.embed = nnx.Param(jax.random.normal(rngs.params(), (v, d), jnp.float32) * d ** -0.5,
                           out_sharding=(None, None), eager_sharding=False)
    self.blocks = nnx.List([
        Block(spec, causal=causal, mesh=mesh, rngs=rngs, use_moe=spec.is_moe_block(i))
        for i in range(spec.num_layers)])
    self.final_norm = RMSNorm(d)
    self.unembed = None if spec.tie_embeddings else nnx.Param(
        jax.random.normal(rngs.params(), (d, v), jnp.float32) * d ** -0.5,
        out_sharding=(None, None), eager_sharding=False)

  def __call__(self, tokens: jax.Array, train: bool = False):
    x = jnp.take(self.embed[...], tokens, axis=0)                       # [B, L, D]
    zero = jnp.zeros((), jnp.float32)
    aux = {'load_balance_loss': zero, 'router_z_loss': zero, 'layers': {}}
    for i, block in enumerate(self.blocks):
      x, layer_aux = block(x, train)
      if layer_aux is not None:
        aux['load_balance_loss'] += layer_aux['load_balance_loss']
        aux['router_z_loss'] += layer_aux['router_z_loss']
        aux['layers'][i] = layer_aux
    x = self.final_norm(x)
    out = self.embed[...].T if self.unembed is None else self.unembed[...]
    return jnp.einsum('bld,dv->blv', x, out).astype(jnp.float32), aux
