"""Decoder-only transformer LM whose FFN per block is dense or MoE.

Shape legend: B batch, L length, D d_model, V vocab, E experts.
Pre-norm blocks: x += attn(norm(x)); x += ffn(norm(x)). Block i is MoE when
num_experts > 0, i >= moe_offset and (i - moe_offset) % moe_every == 0.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from sparse_jax.models.attention import Attention
from sparse_jax.moe import DenseFFN, MoE


class RMSNorm(nnx.Module):
  def __init__(self, d: int, eps: float = 1e-6):
    self.scale = nnx.Param(jnp.ones((d,), jnp.float32), out_sharding=(None,),
                           eager_sharding=False)
    self.eps = eps

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 ** 2, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...]).astype(x.dtype)


def is_moe_block(i: int, num_experts: int, moe_every: int, moe_offset: int) -> bool:
  return num_experts > 0 and i >= moe_offset and (i - moe_offset) % moe_every == 0


class Block(nnx.Module):
  def __init__(self, model_cfg, moe_cfg, *, use_moe: bool, causal: bool,
               mesh: Mesh | None, rngs: nnx.Rngs):
    d, dtype = model_cfg.d_model, jnp.dtype(model_cfg.param_dtype)
    self.attn_norm, self.ffn_norm = RMSNorm(d), RMSNorm(d)
    self.attn = Attention(d, model_cfg.num_heads, head_dim=model_cfg.get('head_dim') or None,
                          init_scale=model_cfg.init_scale,
                          param_dtype=dtype, mesh=mesh, rngs=rngs)
    if use_moe:
      self.ffn = MoE(
          d, moe_cfg.d_ff or model_cfg.d_ff, moe_cfg.num_experts, k=moe_cfg.k,
          capacity_factor=moe_cfg.capacity_factor, dispatch=moe_cfg.dispatch,
          normalize_weights=moe_cfg.get('normalize_weights'),
          activation=model_cfg.activation, mesh=mesh, rngs=rngs, routing=moe_cfg.routing,
          group_size=moe_cfg.group_size or None, causal=causal,
          allow_lookahead=moe_cfg.allow_lookahead, balancing=moe_cfg.balancing,
          bias_rate=moe_cfg.bias_rate, router_jitter=moe_cfg.router_jitter,
          init_scale=moe_cfg.init_scale or model_cfg.init_scale,
          shared_d_ff=moe_cfg.shared_d_ff or None, param_dtype=dtype)
    else:
      self.ffn = DenseFFN(d, model_cfg.d_ff, activation=model_cfg.activation,
                          init_scale=model_cfg.init_scale, param_dtype=dtype, mesh=mesh,
                          rngs=rngs)

  def __call__(self, x, train: bool):
    x = x + self.attn(self.attn_norm(x))
    h = self.ffn_norm(x)
    if isinstance(self.ffn, MoE):
      y, aux = self.ffn(h, train=train)
      return x + y, aux
    return x + self.ffn(h), None


class TransformerLM(nnx.Module):
  """tokens i32[B, L] -> (logits f32[B, L, V], aux).

  aux: 'load_balance_loss' and 'router_z_loss' summed over the MoE blocks (0 for a dense
  model), and 'layers': {block index: that block's routing metrics}.
  """

  def __init__(self, model_cfg, moe_cfg, *, mesh: Mesh | None = None,
               rngs: nnx.Rngs, causal: bool = True):
    d, v = model_cfg.d_model, model_cfg.vocab_size
    self.embed = nnx.Param(jax.random.normal(rngs.params(), (v, d), jnp.float32) * d ** -0.5,
                           out_sharding=(None, None), eager_sharding=False)
    self.blocks = nnx.List([
        Block(model_cfg, moe_cfg, causal=causal, mesh=mesh, rngs=rngs,
              use_moe=is_moe_block(i, moe_cfg.num_experts, moe_cfg.moe_every,
                                   moe_cfg.moe_offset))
        for i in range(model_cfg.num_layers)])
    self.final_norm = RMSNorm(d)
    self.unembed = None if model_cfg.tie_embeddings else nnx.Param(
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
