"""Decoder-only transformer LM whose FFN per block is dense or MoE.

Shape legend: B batch, L length, D d_model, V vocab.
Pre-norm blocks: x += attn(norm(x)); x += ffn(norm(x)). Which blocks are MoE:
ModelSpec.is_moe_block.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx, traverse_util
from jax.sharding import Mesh

from sparse_jax import sharding

from sparse_jax.layers import Attention, DenseFFN, RMSNorm, as_compute
from sparse_jax.mla import LatentAttention
from sparse_jax.models import layout
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


# train.remat policies: what a block keeps for the backward pass ('none': everything).
# 'block' keeps only its input and recomputes the rest; 'dots' keeps the matmul outputs
# and recomputes the elementwise work between them.
REMAT_POLICIES = {'block': jax.checkpoint_policies.nothing_saveable,
                  'dots': jax.checkpoint_policies.dots_saveable}


def _run_block(block: Block, x, train: bool):
  return block(x, train)


def _stack(modules: list[nnx.Module], mesh: Mesh | None) -> nnx.Module:
  """G modules of one structure -> one whose every variable is stacked [G, ...] (the
  partition names get a leading None: the layer axis is not split)."""
  graphdef, _ = nnx.split(modules[0])
  def stack(*vs):
    meta = {}
    if 'out_sharding' in vs[0].get_metadata():
      meta['out_sharding'] = (None, *vs[0].get_metadata()['out_sharding'])
    return vs[0].replace(jnp.stack([v.get_value() for v in vs]), **meta)
  states = [nnx.split(m)[1] for m in modules]
  stacked = nnx.merge(graphdef, jax.tree.map(stack, *states, is_leaf=_is_variable))
  if mesh is not None:
    sharding.put_params(stacked, mesh)
  return stacked


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


class TransformerLM(nnx.Module):
  """tokens i32[B, L] -> (logits f32[B, L, V], aux); B, L >= 1 (empty is a ValueError).

  Activations and matmuls run in spec.dtype (parameters stay in spec.param_dtype); the
  routers, routing statistics and the logits are float32. remat ('none' | 'block' |
  'dots', REMAT_POLICIES) is what each block keeps for the backward pass.

  spec.scan_layers: the repeating pattern of blocks (models.layout) is stacked [G, ...]
  and runs under one lax.scan, so the step compiles one repeat whatever the depth. Built
  from the same seed, both layouts hold the same numbers (each block is initialised in
  order, then stacked) and compute the same function; relayout() moves a model between
  them.

  aux: 'load_balance_loss' and 'router_z_loss' summed over the MoE blocks (0 for a dense
  model), and 'layers': {block index: that block's MoE aux}.
  """

  def __init__(self, spec: ModelSpec, *, mesh: Mesh | None = None, rngs: nnx.Rngs,
               causal: bool = True, remat: str = 'none'):
    d, v = spec.d_model, spec.vocab_size
    if remat not in ('none', *REMAT_POLICIES):
      raise ValueError(f"remat={remat!r} is unknown; use 'none' or one of "
                       f'{tuple(REMAT_POLICIES)}.')
    self.spec, self.mesh, self.causal = spec, mesh, causal
    self.dtype, self.remat = jnp.dtype(spec.dtype), remat
    self.embed = nnx.Param(jax.random.normal(rngs.params(), (v, d), jnp.float32) * d ** -0.5,
                           out_sharding=(None, None), eager_sharding=False)
    blocks = [Block(spec, causal=causal, mesh=mesh, rngs=rngs, use_moe=spec.is_moe_block(i))
              for i in range(spec.num_layers)]
    self.pattern = layout.of_spec(spec) if spec.scan_layers else None
    if self.pattern is None:
      self.blocks, self.stack = nnx.List(blocks), None
    else:
      pat = self.pattern
      self.blocks = nnx.List(blocks[:pat.prefix])
      self.stack = nnx.List([_stack([blocks[pat.index(j, g)] for g in range(pat.repeats)], mesh)
                             for j in range(pat.period)])
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
    policy = REMAT_POLICIES.get(self.remat)
    run = _run_block if policy is None else nnx.remat(
        _run_block, static_argnums=(2,), policy=policy)
    layers = {}
    for i, block in enumerate(self.blocks):
      x, layers[i] = run(block, x, train)
    if self.stack is not None:
      x, stacked = self._scan(x, train, policy)
      layers.update(stacked)
    zero = jnp.zeros((), jnp.float32)
    aux = {'load_balance_loss': zero, 'router_z_loss': zero, 'layers': {}}
    for i in sorted(layers):          # summed in block order, whatever the layout
      if layers[i] is not None:
        aux['load_balance_loss'] += layers[i]['load_balance_loss']
        aux['router_z_loss'] += layers[i]['router_z_loss']
        aux['layers'][i] = layers[i]
    return self._logits(x), aux

  def _scan(self, x, train: bool, policy):
    """The stack under one lax.scan over its G repeats -> (x, {block index: MoE aux})."""
    graphdef, params, rest = nnx.split(self.stack, nnx.Param, ...)

    def body(x, repeat):
      blocks = nnx.merge(graphdef, *repeat)
      auxes = []
      for block in blocks:
        x, a = block(x, train)
        auxes.append(a)
      # Loss-free biases and router RNG counters change in a training call.
      return x, (auxes, nnx.state(blocks, nnx.Not(nnx.Any(nnx.Param, nnx.Intermediate))))

    if policy is not None:
      body = jax.checkpoint(body, policy=policy, prevent_cse=False)
    x, (auxes, rest) = jax.lax.scan(body, x, (params, rest))
    nnx.update(self.stack, rest)
    pat = self.pattern
    return x, {pat.index(j, g): jax.tree.map(lambda a: a[g], auxes[j])
               for j in range(pat.period) for g in range(pat.repeats)}

  def init_cache(self, batch: int, length: int):
    """An empty KV cache of `length` slots per block, in the compute dtype: a list (one
    per block), or for a scanned model {'blocks': the prefix's, 'stack': one per position
    of the pattern, stacked [G, ...]}."""
    caches = [b.attn.init_cache(batch, length, self.dtype) for b in self.blocks]
    if self.stack is None:
      return caches
    g = self.pattern.repeats
    return {'blocks': caches,
            'stack': [jax.tree.map(lambda c: jnp.broadcast_to(c, (g, *c.shape)),
                                   b.attn.init_cache(batch, length, self.dtype))
                      for b in self.stack]}

  def decode(self, tokens: jax.Array, cache, step):
    """tokens i32[B, L], new at `step` (inference.cache.Step: the slot of the first and
    each row's first real slot) -> (logits f32[B, L, V], the cache with them). Prefill is
    one call with the whole prompt; each decode call adds one token per row."""
    x = self._embed(tokens)
    prefix = cache if self.stack is None else cache['blocks']
    new = []
    for block, c in zip(self.blocks, prefix):
      x, c = block.decode(x, c, step)
      new.append(c)
    if self.stack is None:
      return self._logits(x), new
    graphdef, state = nnx.split(self.stack)

    def body(x, repeat):
      state, caches = repeat
      out = []
      for block, c in zip(nnx.merge(graphdef, state), caches):
        x, c = block.decode(x, c, step)
        out.append(c)
      return x, out

    x, stacked = jax.lax.scan(body, x, (state, cache['stack']))
    return self._logits(x), {'blocks': new, 'stack': stacked}

  def param_roles(self) -> dict[str, Role]:
    return {'embed': Role('embedding'),
            **({} if self.unembed is None else {'unembed': Role('embedding', 0)})}

  def stacked_paths(self) -> tuple[tuple, ...]:
    """Paths under which every parameter has a leading layer axis [G, ...] (roles.py)."""
    return () if self.stack is None else tuple(
        (layout.STACKED, j) for j in range(len(self.stack)))

  def moe_layers(self) -> dict[int, MoE]:
    """{block index: its MoE layer}: the keys of aux['layers']. In a scanned model the
    blocks of one position of the pattern share its stacked layer (variables [G, ...])."""
    layers = {i: b.ffn for i, b in enumerate(self.blocks) if isinstance(b.ffn, MoE)}
    if self.stack is not None:
      pat = self.pattern
      layers.update({pat.index(j, g): b.ffn for j, b in enumerate(self.stack)
                     if isinstance(b.ffn, MoE) for g in range(pat.repeats)})
    return layers

  def update_biases(self, demand: dict[int, jax.Array]) -> None:
    """One loss-free balancing step per MoE block from its choice counts {block: f32[E]}
    (MoE.update_bias; a no-op for aux_loss balancing)."""
    for i, b in enumerate(self.blocks):
      if i in demand:
        b.ffn.update_bias(demand[i])
    if self.stack is not None:
      pat = self.pattern
      for j, b in enumerate(self.stack):
        if isinstance(b.ffn, MoE):
          b.ffn.update_bias(jnp.stack([demand[pat.index(j, g)] for g in range(pat.repeats)]))


def relayout(model: TransformerLM, scan_layers: bool) -> TransformerLM:
  """The same model in the other layout (spec.scan_layers), or `model` when it already
  is: parameters, biases and RNG state moved by models.layout, placed on model.mesh."""
  if model.spec.scan_layers == scan_layers:
    return model
  spec = dataclasses.replace(model.spec, scan_layers=scan_layers)
  target = nnx.eval_shape(lambda: TransformerLM(spec, mesh=model.mesh, causal=model.causal,
                                                remat=model.remat, rngs=nnx.Rngs(0)))
  graphdef, abstract = nnx.split(target)
  pat = layout.of_spec(spec)
  values = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model)))
  values = (layout.to_scanned if scan_layers else layout.to_unrolled)(values, pat)
  nnx.replace_by_pure_dict(abstract, traverse_util.unflatten_dict(values))
  out = nnx.merge(graphdef, abstract)
  if model.mesh is not None:
    sharding.put_params(out, model.mesh)
  return out
