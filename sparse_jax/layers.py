"""Dense building blocks: parameter init, the FFN rule, DenseFFN, RMSNorm, RoPE, attention.

Shape legend (the project's, docs/architecture.md): B batch, L length, D d_model, F d_ff,
H heads, Hkv key/value heads, Dh head dim (H * Dh = D unless the model sets head_dim or
was compacted after head pruning), N rows (tokens flattened).
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from sparse_jax.inference import cache as kv_cache
from sparse_jax.roles import Role
from sparse_jax.sharding import spec_for

ACTIVATIONS = ('gelu', 'relu', 'swiglu')


def weight(key, shape, *, init_scale: float = 1.0, dtype=jnp.float32,
           names: Sequence[str | None], mesh: Mesh | None = None) -> nnx.Param:
  """Truncated-normal kernel with variance init_scale / fan_in (Switch uses 0.1).

  Axis -2 is the input (fan-in) axis, axis -1 the output; leading axes (stacked experts)
  are independent. `names` are the partition names per axis ('expert', 'model' or
  None), kept as metadata; with a mesh the value is placed now, so a module can be built
  with or without `jax.set_mesh`.
  """
  init = jax.nn.initializers.variance_scaling(
      init_scale, 'fan_in', 'truncated_normal', in_axis=-2, out_axis=-1,
      batch_axis=tuple(range(len(shape) - 2)))
  value = init(key, shape, dtype)
  if mesh is not None:
    value = jax.device_put(value, NamedSharding(mesh, spec_for(mesh, names)))
  return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


# ------------------------------------------------------------------------- the FFN rule

def check_activation(activation: str) -> None:
  if activation not in ACTIVATIONS:
    raise ValueError(f'activation={activation!r} is unknown; use one of {ACTIVATIONS}.')


def check_floating(x: jax.Array, layer: str) -> None:
  """Refuse integer (or bool) input: the layers compute in x's dtype, so the weights would
  be truncated to integers and the output silently wrong."""
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f'{layer} input dtype {x.dtype} is not floating; cast x to the '
                    "parameters' dtype (e.g. x.astype(jnp.float32)) first.")


def ffn_weight_names(activation: str) -> tuple[str, ...]:
  return ('wi', 'wi_gate', 'wo') if activation == 'swiglu' else ('wi', 'wo')


def as_compute(w, x: jax.Array):
  """Weight w in x's (compute) dtype. A no-op when it already is, which also leaves
  wrapped weights alone (qwix's quantised arrays intercept the matmul themselves)."""
  return w if w.dtype == x.dtype else w.astype(x.dtype)


def _matmul(x, w):
  return jnp.einsum('nd,df->nf', x, w)


def ffn_hidden(w: dict[str, jax.Array], x: jax.Array, activation: str,
               matmul: Callable = _matmul) -> jax.Array:
  """The hidden units that multiply wo, activate(x @ wi[, x @ wi_gate]). x [N, D] ->
  [N, F], in x's dtype. `matmul(x, w)` lets the dropless path use a grouped matmul."""
  return activate(activation, *(matmul(x, as_compute(w[n], x))
                                 for n in ffn_weight_names(activation) if n != 'wo'))


def activate(activation: str, h: jax.Array, gate: jax.Array | None = None) -> jax.Array:
  """The hidden units from the pre-activations h = x @ wi (and gate = x @ wi_gate for
  swiglu), elementwise: gelu(h) (jax.nn.gelu's default approximation), relu(h), or
  silu(gate) * h."""
  if activation == 'swiglu':
    return jax.nn.silu(gate) * h
  return {'gelu': jax.nn.gelu, 'relu': jax.nn.relu}[activation](h)


def ffn(w: dict[str, jax.Array], x: jax.Array, activation: str,
        matmul: Callable = _matmul) -> jax.Array:
  """ffn_hidden(x) @ wo. x [N, D] -> [N, D]. The compute dtype is x's: float32 weights
  are cast to it (mixed precision keeps float32 master weights)."""
  return matmul(ffn_hidden(w, x, activation, matmul), as_compute(w['wo'], x))


class DenseFFN(nnx.Module):
  """Dense FFN, x [..., D] -> [..., D]: every dense block, the shared expert, the
  benchmarks' baseline. Hidden units are split over the mesh axis 'model'. x must be
  floating (integer x is a TypeError), as for RMSNorm, Attention and the MoE. kind is
  its parameters' role: 'ffn', or 'shared' for an MoE's shared expert."""

  def __init__(self, d_model: int, d_ff: int, *, activation: str = 'gelu',
               init_scale: float = 1.0, param_dtype=jnp.float32,
               mesh: Mesh | None = None, kind: str = 'ffn', rngs: nnx.Rngs):
    check_activation(activation)
    self.activation, self.kind = activation, kind
    for name in ffn_weight_names(activation):
      shape, names = ((d_ff, d_model), ('model', None)) if name == 'wo' else (
          (d_model, d_ff), (None, 'model'))
      setattr(self, name, weight(rngs.params(), shape, init_scale=init_scale,
                                 dtype=param_dtype, names=names, mesh=mesh))

  def weights(self) -> dict[str, jax.Array]:
    return {n: getattr(self, n)[...] for n in ffn_weight_names(self.activation)}

  def param_roles(self) -> dict[str, Role]:
    return {n: Role(self.kind, 0) for n in ffn_weight_names(self.activation)}

  def __call__(self, x: jax.Array) -> jax.Array:
    check_floating(x, 'DenseFFN')
    return ffn(self.weights(), x.reshape(-1, x.shape[-1]), self.activation).reshape(x.shape)


class RMSNorm(nnx.Module):
  def __init__(self, d: int, eps: float = 1e-6):
    self.scale = nnx.Param(jnp.ones((d,), jnp.float32), out_sharding=(None,),
                           eager_sharding=False)
    self.eps = eps

  def param_roles(self) -> dict[str, Role]:
    return {'scale': Role('norm')}

  def __call__(self, x):
    check_floating(x, 'RMSNorm')
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 ** 2, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...]).astype(x.dtype)


# --------------------------------------------------------------------------- attention

def rope(x: jax.Array, theta: float = 10_000.0, positions: jax.Array | None = None) -> jax.Array:
  """Rotate channel pairs (i, i + Dh/2) by position-dependent angles. x [B, L, H, Dh];
  positions i32[B, L] (default 0 .. L-1 in every row)."""
  l, h = x.shape[1], x.shape[-1]
  freq = theta ** (-jnp.arange(0, h // 2, dtype=jnp.float32) / (h // 2))   # [Dh/2]
  if positions is None:
    angle = jnp.arange(l, dtype=jnp.float32)[:, None] * freq              # [L, Dh/2]
    cos, sin = jnp.cos(angle)[None, :, None, :], jnp.sin(angle)[None, :, None, :]
  else:
    angle = positions.astype(jnp.float32)[..., None] * freq               # [B, L, Dh/2]
    cos, sin = jnp.cos(angle)[:, :, None, :], jnp.sin(angle)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


QK_NORMS = ('none', 'head', 'proj')


def _project(x, w, bias):
  """x [B, L, D] @ w [D, N] (+ bias [N]) -> [B, L, N]."""
  y = jnp.einsum('bld,dk->blk', x, as_compute(w[...], x))
  return y if bias is None else y + as_compute(bias[...], x)


class Attention(nnx.Module):
  """Causal multi-head self-attention with RoPE. x [B, L, D] -> [B, L, D], computed in
  x's dtype. Heads are split over the mesh axis 'model'.

  num_kv_heads < num_heads is grouped-query attention (each key/value head serves
  num_heads / num_kv_heads query heads). qk_norm: 'head' applies an RMSNorm over each
  head's Dh channels of q and k (Qwen3), 'proj' one over the whole q and k projections
  (OLMoE), both before RoPE. qkv_bias adds biases bq, bk, bv to the projections (Qwen2).
  qkv_clip > 0 clamps q, k and v to [-qkv_clip, qkv_clip] after those norms (OLMoE).
  """

  def __init__(self, d_model: int, num_heads: int, *, head_dim: int | None = None,
               num_kv_heads: int | None = None, qk_norm: str = 'none',
               qkv_bias: bool = False, qkv_clip: float = 0.0, rope_theta: float = 10_000.0,
               norm_eps: float = 1e-6,
               init_scale: float = 1.0, param_dtype=jnp.float32, mesh: Mesh | None = None,
               rngs: nnx.Rngs):
    head_dim = head_dim or d_model // num_heads
    if head_dim % 2 or (head_dim == d_model // num_heads and d_model % num_heads):
      raise ValueError(f'd_model={d_model} must be num_heads={num_heads} times an even '
                       'head dimension (RoPE rotates channel pairs).')
    kv = num_kv_heads or num_heads
    if num_heads % kv:
      raise ValueError(f'num_kv_heads={kv} must divide num_heads={num_heads}.')
    if qk_norm not in QK_NORMS:
      raise ValueError(f'qk_norm={qk_norm!r} is unknown; use one of {QK_NORMS}.')
    self.num_heads, self.num_kv_heads, self.rope_theta = num_heads, kv, rope_theta
    kw = dict(init_scale=init_scale, dtype=param_dtype, mesh=mesh)
    # Separate q, k, v kernels so a 'model' split of their output axis splits heads.
    widths = (num_heads * head_dim, kv * head_dim, kv * head_dim)
    self.wq, self.wk, self.wv = (
        weight(rngs.params(), (d_model, n), names=(None, 'model'), **kw) for n in widths)
    self.wo = weight(rngs.params(), (widths[0], d_model), names=('model', None), **kw)
    self.bq, self.bk, self.bv = (
        nnx.Param(jnp.zeros((n,), param_dtype), out_sharding=('model',),
                  eager_sharding=False) if qkv_bias else None for n in widths)
    self.q_norm, self.k_norm = (
        None if qk_norm == 'none' else
        RMSNorm(head_dim if qk_norm == 'head' else n, eps=norm_eps) for n in widths[:2])
    self.qk_norm, self.qkv_clip = qk_norm, qkv_clip

  def param_roles(self) -> dict[str, Role]:
    return {**{n: Role('attention', 0) for n in ('wq', 'wk', 'wv', 'wo')},
            **{n: Role('attention') for n in ('bq', 'bk', 'bv') if getattr(self, n) is not None}}

  def kernel_inputs(self, x: jax.Array) -> dict[str, Callable[[], jax.Array]]:
    """{kernel name: () -> what it multiplies} for x [B, L, D], in forward order: x for
    wq, wk, wv, and the attention context [B, L, H*Dh] for wo. One-shot pruning calls
    each after pruning the kernels before it, so wo sees the pruned q, k, v."""
    return {'wq': lambda: x, 'wk': lambda: x, 'wv': lambda: x, 'wo': lambda: self.context(x)}

  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.einsum('blk,kd->bld', self.context(x), as_compute(self.wo[...], x))

  def init_cache(self, batch: int, length: int, dtype) -> dict[str, jax.Array]:
    """An empty cache of `length` slots: 'k', 'v' [B, T, Hkv, Dh] (after RoPE and norms)."""
    shape = (batch, length, self.num_kv_heads, self.wk.shape[-1] // self.num_kv_heads)
    return {'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype)}

  def decode(self, x: jax.Array, cache: dict, step: kv_cache.Step):
    """x [B, L, D], the new tokens at `step` -> (y [B, L, D], the cache with them)."""
    out, cache = self._context(x, cache, step)
    return jnp.einsum('blk,kd->bld', out, as_compute(self.wo[...], x)), cache

  def context(self, x: jax.Array) -> jax.Array:
    """The heads' outputs, concatenated: [B, L, H*Dh], the input of wo."""
    return self._context(x, None, None)[0]

  def _context(self, x, cache, step):
    check_floating(x, 'Attention')
    b, l, d = x.shape
    q, k, v = (_project(x, w, bias)
               for w, bias in ((self.wq, self.bq), (self.wk, self.bk), (self.wv, self.bv)))
    if self.qk_norm == 'proj':
      q, k = self.q_norm(q), self.k_norm(k)
    if self.qkv_clip:
      q, k, v = (jnp.clip(t, -self.qkv_clip, self.qkv_clip) for t in (q, k, v))
    q = q.reshape(b, l, self.num_heads, -1)                              # [B, L, H, Dh]
    k, v = (t.reshape(b, l, self.num_kv_heads, -1) for t in (k, v))      # [B, L, Hkv, Dh]
    if self.qk_norm == 'head':
      q, k = self.q_norm(q), self.k_norm(k)
    if cache is None:
      out = jax.nn.dot_product_attention(rope(q, self.rope_theta), rope(k, self.rope_theta),
                                         v, is_causal=True)
      return out.reshape(b, l, -1), None
    pos = step.positions(l)
    cache = {'k': kv_cache.write(cache['k'], rope(k, self.rope_theta, pos), step.slot),
             'v': kv_cache.write(cache['v'], v, step.slot)}
    out = jax.nn.dot_product_attention(rope(q, self.rope_theta, pos), cache['k'], cache['v'],
                                       mask=step.mask(l, cache['k'].shape[1]))
    return out.reshape(b, l, -1), cache
