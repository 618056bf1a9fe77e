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

from sparse_jax.layers import Attention, DenseFFN, RMSNorm, as_compute
from sparse_jax.mla import LatentAttention
from sparse_jax.moe import MoE
from sparse_jax.roles import Role
from sparse_jax.specs import ModelSpec


class FFNInput(nnx.Intermediate):
  """The normed input of a block's FFN, sown when the block's `sow_ffn_input` is set
  (what sparse_jax.analysis.activations reads)."""


class Block(nnx.Module):
  def __init__(self, spec: ModelSpec, *, use_moe: bool, causal: bool, mesh: Mesh | None,
               rngs: nnx.Rngs):
    d, dtype = spec.d_model, jnp.dtype(spec.param_dtype)
    self.sow_ffn_input = False
    self.attn_norm, self.ffn_norm = RMSNorm(d, spec.norm_eps), RMSNorm(d, spec.norm_eps)
    kw = dict(rope_theta=spec.rope_theta, norm_eps=spec.norm_eps, init_scale=spec.init_scale,
              param_dtype=dtype, mesh=mesh, rngs=rngs)
    if spec.kv_lora_rank:
      self.attn = LatentAttention(
          d, spec.num_heads, q_lora_rank=spec.q_lora_rank, kv_lora_rank=spec.kv_lora_rank,
          qk_nope_head_dim=spec.qk_nope_head_dim, qk_rope_head_dim=spec.qk_rope_head_dim,
          v_head_dim=spec.v_head_dim, rope_interleave=spec.rope_interleave, **kw)
    else:
      self.attn = Attention(d, spec.num_heads, head_dim=spec.head_dim,
                            num_kv_heads=spec.kv_heads, qk_norm=spec.qk_norm,
                            qkv_bias=spec.qkv_bias, qkv_clip=spec.qkv_clip, **kw)
    if use_moe:
      self.ffn = MoE(d, spec.moe.d_ff, spec.moe.num_experts, activation=spec.activation,
                     causal=causal, param_dtype=dtype, mesh=mesh, rngs=rngs,
                     **spec.moe.layer_kwargs())
    else:
      self.ffn = DenseFFN(d, spec.d_ff, activation=spec.activation,
                          init_scale=spec.init_scale, param_dtype=dtype, mesh=mesh,
                          rngs=rngs)

  def inputs(self, x):
    """(attention input, the residual after attention, FFN input), each [B, L, D]: the
    one wiring of a block, which calibration (one-shot and expert pruning) reads too."""
    return self._wire(x)[:3]

  def _wire(self, x, cache=None, step=None):
    a = self.attn_norm(x)
    if cache is None:
      y = self.attn(a)
    else:
      y, cache = self.attn.decode(a, cache, step)
    x = x + y
    return a, x, self.ffn_norm(x), cache

  def __call__(self, x, train: bool):
    _, x, h, _ = self._wire(x)
    if self.sow_ffn_input:
      self.sow(FFNInput, 'ffn_input', h)
    if isinstance(self.ffn, MoE):
      y, aux = self.ffn(h, train=train)
      return x + y, aux
    return x + self.ffn(h), None

  def decode(self, x, cache: dict, step):
    """x [B, L, D], new tokens at `step` (inference.cache.Step) -> (x, cache). An MoE FFN
    routes dropless (MoE.generate): no token is dropped while generating."""
    _, x, h, cache = self._wire(x, cache, step)
    return x + (self.ffn.generate(h) if isinstance(self.ffn, MoE) else self.ffn(h)), cache


def _run_block(block: Block, x, train: bool):
  return block(x, train)


# Recompute the block in the backward pass: only its input is saved.
_run_block_remat = nnx.remat(_run_block, static_argnums=(2,))


class TransformerLM(nnx.Module):
  """tokens i32[B, L] -> (logits f32[B, L, V], aux); B, L >= 1 (empty is a ValueError).

  Activations and matmuls run in spec.dtype (parameters stay in spec.param_dtype); the
  routers, routing statistics and the logits are float32. remat=True recomputes each
  block in the backward pass instead of keeping its activations.

  aux: 'load_balance_loss' and 'router_z_loss' summed over the MoE blocks (0 for a dense
  model), and 'layers': {block index: that block's MoE aux}.
  """

  def __init__(self, spec: ModelSpec, *, mesh: Mesh | None = None, rngs: nnx.Rngs,
               causal: bool = True, remat: bool = False):
    d, v = spec.d_model, spec.vocab_size
    self.dtype, self.remat = jnp.dtype(spec.dtype), remat
    self.embed = nnx.Param(jax.random.normal(rngs.params(), (v, d), jnp.float32) * d ** -0.5,
                           out_sharding=(None, None), eager_sharding=False)
    self.blocks = nnx.List([
        Block(spec, causal=causal, mesh=mesh, rngs=rngs, use_moe=spec.is_moe_block(i))
        for i in range(spec.num_layers)])
    self.final_norm = RMSNorm(d, spec.norm_eps)
    self.unembed = None if spec.tie_embeddings else nnx.Param(
        jax.random.normal(rngs.params(), (d, v), jnp.float32) * d ** -0.5,
        out_sharding=(None, None), eager_sharding=False)

  def _embed(self, tokens):
    if tokens.ndim != 2 or not tokens.shape[0] or not tokens.shape[1]:
      raise ValueError(f'tokens must be [B, L] with B >= 1 and L >= 1; got shape '
                       f'{tuple(tokens.shape)}. Pass at least one non-empty sequence.')
    return jnp.take(self.embed[...], tokens, axis=0).astype(self.dtype)  # [B, L, D]

  def _logits(self, x):
    x = self.final_norm(x)
    out = self.embed[...].T if self.unembed is None else self.unembed[...]
    return jnp.einsum('bld,dv->blv', x, as_compute(out, x),
                      preferred_element_type=jnp.float32)

  def __call__(self, tokens: jax.Array, train: bool = False):
    x = self._embed(tokens)
    zero = jnp.zeros((), jnp.float32)
    aux = {'load_balance_loss': zero, 'router_z_loss': zero, 'layers': {}}
    run = _run_block_remat if self.remat else _run_block
    for i, block in enumerate(self.blocks):
      x, layer_aux = run(block, x, train)
      if layer_aux is not None:
        aux['load_balance_loss'] += layer_aux['load_balance_loss']
        aux['router_z_loss'] += layer_aux['router_z_loss']
        aux['layers'][i] = layer_aux
    return self._logits(x), aux

  def init_cache(self, batch: int, length: int) -> list[dict]:
    """An empty KV cache of `length` slots per block, in the compute dtype."""
    return [b.attn.init_cache(batch, length, self.dtype) for b in self.blocks]

  def decode(self, tokens: jax.Array, cache: list[dict], step):
    """tokens i32[B, L], new at `step` (inference.cache.Step: the slot of the first and
    each row's first real slot) -> (logits f32[B, L, V], the cache with them). Prefill is
    one call with the whole prompt; each decode call adds one token per row."""
    x = self._embed(tokens)
    new = []
    for block, c in zip(self.blocks, cache):
      x, c = block.decode(x, c, step)
      new.append(c)
    return self._logits(x), new

  def param_roles(self) -> dict[str, Role]:
    return {'embed': Role('embedding'),
            **({} if self.unembed is None else {'unembed': Role('embedding', 0)})}

  def moe_layers(self) -> dict[int, MoE]:
    """{block index: its MoE layer}: the keys of aux['layers']."""
    return {i: b.ffn for i, b in enumerate(self.blocks) if isinstance(b.ffn, MoE)}
