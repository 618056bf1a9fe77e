"""Multi-head latent attention (DeepSeek-V2/V3): keys and values from a low-rank latent.

Shape legend: B batch, L length, D d_model, H heads, Dn / Dr / Dv the no-RoPE, RoPE and
value head dims, Rq / Rkv the q and kv latent ranks.

  q      = wq_b(q_a_norm(x @ wq_a))          [B, L, H, Dn + Dr]   (x @ wq when Rq = 0)
  latent, k_rot = split(x @ wkv_a)           [B, L, Rkv], [B, L, 1, Dr]: one RoPE key
                                             shared by every head
  k_nope, v = split(kv_a_norm(latent) @ wkv_b)  [B, L, H, Dn], [B, L, H, Dv]
  attention(q, [k_nope | k_rot], v) with RoPE on the Dr channels only, scale
  (Dn + Dr)^-1/2; out = heads concatenated @ wo.

rope_interleave pairs channels (2i, 2i+1) instead of (i, i + Dr/2): the same rotation
applied after moving even channels before odd ones, which leaves q.k unchanged.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from sparse_jax.inference import cache as kv_cache
from sparse_jax.layers import RMSNorm, as_compute, check_floating, rope, weight
from sparse_jax.roles import Role


class LatentAttention(nnx.Module):
  """Causal MLA, x [B, L, D] -> [B, L, D]; heads split over the mesh axis 'model'."""

  def __init__(self, d_model: int, num_heads: int, *, q_lora_rank: int, kv_lora_rank: int,
               qk_nope_head_dim: int, qk_rope_head_dim: int, v_head_dim: int,
               rope_theta: float = 10_000.0, rope_interleave: bool = False,
               norm_eps: float = 1e-6, init_scale: float = 1.0, param_dtype=jnp.float32,
               mesh: Mesh | None = None, rngs: nnx.Rngs):
    if qk_rope_head_dim % 2:
      raise ValueError(f'qk_rope_head_dim={qk_rope_head_dim} must be even (RoPE rotates '
                       'channel pairs).')
    self.num_heads, self.rope_theta, self.rope_interleave = num_heads, rope_theta, rope_interleave
    self.dims = (qk_nope_head_dim, qk_rope_head_dim, v_head_dim)
    self.kv_lora_rank = kv_lora_rank
    kw = dict(init_scale=init_scale, dtype=param_dtype, mesh=mesh)
    qk = num_heads * (qk_nope_head_dim + qk_rope_head_dim)
    if q_lora_rank:
      self.wq_a = weight(rngs.params(), (d_model, q_lora_rank), names=(None, None), **kw)
      self.q_a_norm = RMSNorm(q_lora_rank, norm_eps)
      self.wq_b = weight(rngs.params(), (q_lora_rank, qk), names=(None, 'model'), **kw)
      self.wq = None
    else:
      self.wq = weight(rngs.params(), (d_model, qk), names=(None, 'model'), **kw)
      self.wq_a = self.q_a_norm = self.wq_b = None
    self.wkv_a = weight(rngs.params(), (d_model, kv_lora_rank + qk_rope_head_dim),
                        names=(None, None), **kw)
    self.kv_a_norm = RMSNorm(kv_lora_rank, norm_eps)
    self.wkv_b = weight(rngs.params(), (kv_lora_rank, num_heads * (qk_nope_head_dim + v_head_dim)),
                        names=(None, 'model'), **kw)
    self.wo = weight(rngs.params(), (num_heads * v_head_dim, d_model), names=('model', None), **kw)

  def param_roles(self) -> dict[str, Role]:
    return {n: Role('attention', 0) for n in ('wq', 'wq_a', 'wq_b', 'wkv_a', 'wkv_b', 'wo')
            if getattr(self, n) is not None}

  def _q_latent(self, x):
    return self.q_a_norm(jnp.einsum('bld,dr->blr', x, as_compute(self.wq_a[...], x)))

  def _kv_latent(self, x):
    kv = jnp.einsum('bld,dr->blr', x, as_compute(self.wkv_a[...], x))
    return self.kv_a_norm(kv[..., :self.kv_lora_rank]), kv[..., self.kv_lora_rank:]

  def kernel_inputs(self, x: jax.Array) -> dict:
    """{kernel name: () -> what it multiplies} for x [B, L, D], in forward order (as
    Attention.kernel_inputs: each called after the kernels before it are pruned)."""
    q = ({'wq_a': lambda: x, 'wq_b': lambda: self._q_latent(x)} if self.wq is None
         else {'wq': lambda: x})
    return {**q, 'wkv_a': lambda: x, 'wkv_b': lambda: self._kv_latent(x)[0],
            'wo': lambda: self.context(x)}

  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.einsum('blk,kd->bld', self.context(x), as_compute(self.wo[...], x))

  def init_cache(self, batch: int, length: int, dtype) -> dict[str, jax.Array]:
    """An empty cache of `length` slots: the normed latent 'latent' [B, T, Rkv] and the
    RoPE key 'k_rope' [B, T, Dr] (one per token, shared by the heads)."""
    return {'latent': jnp.zeros((batch, length, self.kv_lora_rank), dtype),
            'k_rope': jnp.zeros((batch, length, self.dims[1]), dtype)}

  def decode(self, x: jax.Array, cache: dict, step: kv_cache.Step):
    """x [B, L, D], the new tokens at `step` -> (y [B, L, D], the cache with them)."""
    out, cache = self._context(x, cache, step)
    return jnp.einsum('blk,kd->bld', out, as_compute(self.wo[...], x)), cache

  def _rope(self, t, positions=None):
    if self.rope_interleave:
      t = jnp.concatenate([t[..., 0::2], t[..., 1::2]], axis=-1)
    return rope(t, self.rope_theta, positions)

  def context(self, x: jax.Array) -> jax.Array:
    """The heads' outputs, concatenated: [B, L, H*Dv], the input of wo."""
    return self._context(x, None, None)[0]

  def _context(self, x, cache, step):
    check_floating(x, 'LatentAttention')
    b, l, _ = x.shape
    h, (dn, dr, dv) = self.num_heads, self.dims
    if self.wq is None:
      q = jnp.einsum('blr,rk->blk', self._q_latent(x), as_compute(self.wq_b[...], x))
    else:
      q = jnp.einsum('bld,dk->blk', x, as_compute(self.wq[...], x))
    q = q.reshape(b, l, h, dn + dr)
    latent, k_rot = self._kv_latent(x)
    pos = None if cache is None else step.positions(l)
    k_rot = self._rope(k_rot[:, :, None, :], pos)[:, :, 0]               # [B, L, Dr]
    if cache is not None:                     # attend over every slot: [B, T, ...]
      cache = {'latent': kv_cache.write(cache['latent'], latent, step.slot),
               'k_rope': kv_cache.write(cache['k_rope'], k_rot, step.slot)}
      latent, k_rot = cache['latent'], cache['k_rope']
    t = latent.shape[1]
    kv = jnp.einsum('btr,rk->btk', latent, as_compute(self.wkv_b[...], x)).reshape(b, t, h, dn + dv)
    k_rot = jnp.broadcast_to(k_rot[:, :, None, :], (b, t, h, dr))
    q = jnp.concatenate([q[..., :dn], self._rope(q[..., dn:], pos)], axis=-1)
    k = jnp.concatenate([kv[..., :dn], k_rot], axis=-1)
    v = kv[..., dn:]
    # dot_product_attention wants one head dim for q, k and v (jax 0.10): zero-pad the
    # narrower side, which changes no score and no output, and give the scale explicitly.
    width = max(dn + dr, dv)
    pad = lambda t: jnp.pad(t, ((0, 0),) * 3 + ((0, width - t.shape[-1]),))
    mask = None if cache is None else step.mask(l, t)
    out = jax.nn.dot_product_attention(pad(q), pad(k), pad(v), is_causal=cache is None,
                                       mask=mask, scale=(dn + dr) ** -0.5)
    return out[..., :dv].reshape(b, l, h * dv), cache
