"""Activation-sparsity probes and honest accounting of parameters and FLOPs.

Shape legend: B batch, L length, T = B*L tokens, D d_model, F d_ff, E experts,
K experts per token, N rows (tokens an expert processed, padded), W windows.

Three views of one model, all read from the model itself (its parameters and modules),
not from its config, so pruned or compacted models are counted as they are:

  activation_sparsity(model, tokens)  per FFN block: zero / near-zero hidden units,
                                      dead neurons, active union over token windows.
  param_counts(model, masks)          total, active per token, embedding, non-zero.
  flops_per_token(model, seq_len)     forward (by part) and training FLOPs per token.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_jax import dispatch as dispatch_lib
from sparse_jax.models.attention import Attention
from sparse_jax.models.transformer import RMSNorm
from sparse_jax.moe import ACTIVATIONS, DenseFFN, MoE, route_groups
from sparse_jax.pruning.paths import plain_path
from sparse_jax.sharding import axis_size, token_axes

DEFAULT_THRESHOLD = 1e-2
DEFAULT_WINDOWS = (1, 16, 256)


# ------------------------------------------------------------------ pure statistics

def hidden_activations(w: dict[str, jax.Array], x: jax.Array, activation: str) -> jax.Array:
  """The FFN hidden units that multiply wo. x [N, D] -> [N, F].

  act(x @ wi), or silu(x @ wi_gate) * (x @ wi) for swiglu (as moe.ffn computes them).
  """
  h = jnp.einsum('nd,df->nf', x, w['wi'])
  if activation == 'swiglu':
    return jax.nn.silu(jnp.einsum('nd,df->nf', x, w['wi_gate'])) * h
  return ACTIVATIONS[activation](h)


def is_active(h: jax.Array, activation: str, threshold: float = DEFAULT_THRESHOLD) -> jax.Array:
  """bool, same shape as h. relu: h != 0 (exact zeros, threshold unused);
  gelu / swiglu never give exact zeros, so a unit is inactive when |h| < threshold."""
  if activation == 'relu':
    return h != 0
  return jnp.abs(h) >= threshold


def zero_fraction(active: jax.Array, valid: jax.Array | None = None) -> jax.Array:
  """Fraction of (row, unit) entries that are inactive. active bool[..., N, F],
  valid bool[..., N] (rows that are real tokens; default all)."""
  valid = jnp.ones(active.shape[:-1], bool) if valid is None else valid
  inactive = jnp.sum(~active & valid[..., None])
  return inactive / jnp.maximum(jnp.sum(valid) * active.shape[-1], 1)


def dead_neurons(active: jax.Array, valid: jax.Array | None = None) -> jax.Array:
  """bool[..., F]: units never active on any valid row. active bool[..., N, F]."""
  valid = jnp.ones(active.shape[:-1], bool) if valid is None else valid
  return ~jnp.any(active & valid[..., None], axis=-2)


def window_stats(active: jax.Array, count: jax.Array, window: int):
  """Active-unit union over windows of `window` consecutive rows (Lazy Neuron view).

  active bool[E, N, F] with the count i32[E] valid rows of each stack first. Windows do
  not overlap; a trailing incomplete window is left out. Returns (sum over complete
  windows of the fraction of units active at least once f32[E], windows i32[E]).
  """
  e, n, f = active.shape
  w = -(-n // window)                                                  # W, ceil
  a = jnp.pad(active, ((0, 0), (0, w * window - n), (0, 0)))
  frac = jnp.mean(jnp.any(a.reshape(e, w, window, f), axis=2), axis=-1)  # [E, W]
  complete = (jnp.arange(w) + 1) * window <= count[:, None]             # [E, W]
  return jnp.sum(jnp.where(complete, frac, 0.0), axis=1), jnp.sum(complete, axis=1)


def window_union(active: jax.Array, window: int) -> jax.Array:
  """Mean fraction of units active at least once within `window` consecutive rows.
  active bool[N, F] -> f32[] (NaN when N < window)."""
  s, n = window_stats(active[None], jnp.array([active.shape[0]]), window)
  return s[0] / n[0]


# ----------------------------------------------------------- probes over a model

def ffn_inputs(model, tokens: jax.Array) -> dict[int, jax.Array]:
  """{block index: the normed input of its FFN [B, L, D]} for a TransformerLM.

  Runs the blocks as TransformerLM.__call__ does (x += attn(norm(x)); x += ffn(norm(x))),
  so the model needs no hook.
  """
  x = jnp.take(model.embed[...], tokens, axis=0)                      # [B, L, D]
  out = {}
  for i, block in enumerate(model.blocks):
    x = x + block.attn(block.attn_norm(x))
    out[i] = h = block.ffn_norm(x)
    y = block.ffn(h)
    x = x + (y[0] if isinstance(block.ffn, MoE) else y)
  return out


def _dense_weights(ffn: DenseFFN):
  names = ('wi', 'wi_gate') if ffn.activation == 'swiglu' else ('wi',)
  return {n: getattr(ffn, n)[...] for n in names}


def _routed_rows(layer: MoE, h: jax.Array):
  """Each expert's tokens, in token order. h [B, L, D] -> (x [E, N, D], count i32[E],
  kept fraction of all choices). Routes like MoE._routed: same groups (the tokens one
  device holds unless group_size), capacity, bias and dropping."""
  b, l, d = h.shape
  st, e = layer.settings, layer.num_experts
  shards = math.prod(axis_size(layer.mesh, a) for a in token_axes(layer.mesh))
  s = st.group_size or b // shards * l
  g = b * l // s
  logits = layer.router(h, train=False).reshape(g, s, e)               # f32[G, S, E]
  bias = layer.router.bias[...] if layer.balancing == 'loss_free' else None
  plan, c = route_groups(st, logits, bias)                             # [G, S, K]
  sm = dispatch_lib.slot_map(plan, e, c)
  src, filled = sm.src.reshape(e, g * c), sm.filled.reshape(e, g * c)  # [E, N]
  # Slots are in priority order (choice-major); windows want token order.
  order = jnp.argsort(jnp.where(filled, src, b * l), axis=1, stable=True)
  src = jnp.take_along_axis(src, order, axis=1)
  x = jnp.take(h.reshape(b * l, d), src, axis=0)                       # [E, N, D]
  return x, jnp.sum(filled, axis=1), jnp.mean(plan.kept.astype(jnp.float32))


def _stack_stats(hidden, count, activation, threshold, windows):
  """Statistics of stacked hidden activations [E, N, F] with count[E] valid rows."""
  valid = jnp.arange(hidden.shape[1]) < count[:, None]                 # [E, N]
  active = is_active(hidden, activation, threshold) & valid[..., None]
  inactive = jnp.sum(~active & valid[..., None], axis=(1, 2))          # [E]
  win = {w: window_stats(active, count, w) for w in windows}
  return dict(tokens=count, inactive=inactive, dead=jnp.sum(dead_neurons(active, valid), -1),
              windows=win)


@functools.partial(nnx.jit, static_argnames=('threshold', 'windows'))
def _probe_arrays(model, tokens, threshold, windows):
  out = {}
  for i, h in ffn_inputs(model, tokens).items():
    ffn = model.blocks[i].ffn
    if isinstance(ffn, MoE):
      x, count, kept = _routed_rows(ffn, h)
      w = ffn.experts.weights()
      hid = jax.vmap(functools.partial(hidden_activations,
                                       activation=ffn.experts.activation))(w, x)
      out[i] = dict(routed=_stack_stats(hid, count, ffn.experts.activation, threshold,
                                        windows), kept=kept)
      if ffn.shared is not None:
        sh = ffn.shared
        hid = hidden_activations(_dense_weights(sh), h.reshape(-1, h.shape[-1]),
                                 sh.activation)[None]
        out[i]['shared'] = _stack_stats(hid, jnp.array([hid.shape[1]]), sh.activation,
                                        threshold, windows)
    else:
      hid = hidden_activations(_dense_weights(ffn), h.reshape(-1, h.shape[-1]),
                               ffn.activation)[None]                   # [1, T, F]
      out[i] = dict(dense=_stack_stats(hid, jnp.array([hid.shape[1]]), ffn.activation,
                                       threshold, windows))
  return out


def _summary(st, d_ff, rows=None):
  """Python floats from _stack_stats arrays; rows selects experts (default all pooled)."""
  rows = slice(None) if rows is None else rows
  tokens, inactive, dead = (np.asarray(st[k])[rows].sum() for k in ('tokens', 'inactive', 'dead'))
  units = np.asarray(st['tokens'])[rows].size * d_ff
  win = {}
  for w, (s, n) in st['windows'].items():
    s, n = np.asarray(s)[rows].sum(), np.asarray(n)[rows].sum()
    win[w] = float(s / n) if n else None
  return {'tokens': int(tokens),
          'zero_fraction': float(inactive / (tokens * d_ff)) if tokens else None,
          'dead_neurons': int(dead), 'dead_fraction': float(dead / units),
          'window_active_fraction': win}


def activation_sparsity(model, tokens: jax.Array, *, threshold: float = DEFAULT_THRESHOLD,
                        windows: tuple[int, ...] = DEFAULT_WINDOWS) -> dict[int, dict]:
  """Activation sparsity of every FFN block of a TransformerLM on tokens i32[B, L].

  A hidden unit h (the value that multiplies wo) is inactive when h == 0 for relu, and
  when |h| < threshold (absolute; default 1e-2) for gelu and swiglu, which are never
  exactly 0. The FFN input is RMS-normed, so the scale of h is set by the weights.

  Returns {block index: dict} with plain Python numbers (JSON-able; None where a
  statistic has no data):
    kind              'dense' | 'moe'
    activation, threshold (None for relu: exact zeros), d_ff
    tokens            rows computed: T for a dense FFN; kept (token, expert) choices
                      for MoE experts (dropped choices run no expert and are not counted)
    zero_fraction     inactive share of all computed (row, unit) hidden values
    dead_neurons      units never active on any row (an expert that got no token
                      has all its units dead), and dead_fraction of all units
    window_active_fraction  {w: mean over complete windows of w consecutive rows of the
                      share of units active at least once}; rows are tokens in row-major
                      [B, L] order (a window longer than L spans sequences), an expert's
                      rows are its own tokens in that order. None when no window fits.
  MoE blocks add 'num_experts', 'k', 'dropped_fraction' (choices that found no slot),
  'experts' (a list of the same statistics per expert) and 'shared' (the shared
  expert's, when present); the block-level numbers pool all experts' rows.
  """
  arrays = jax.device_get(_probe_arrays(model, tokens, float(threshold), tuple(windows)))
  out = {}
  for i, a in arrays.items():
    ffn = model.blocks[i].ffn
    act = ffn.experts.activation if isinstance(ffn, MoE) else ffn.activation
    head = {'activation': act, 'threshold': None if act == 'relu' else float(threshold)}
    if 'dense' in a:
      out[i] = {'kind': 'dense', **head, 'd_ff': ffn.wi.shape[-1],
                **_summary(a['dense'], ffn.wi.shape[-1])}
      continue
    f, e = ffn.experts.wi.shape[-1], ffn.num_experts
    out[i] = {'kind': 'moe', **head, 'd_ff': f, 'num_experts': e, 'k': ffn.settings.k,
              'dropped_fraction': float(1.0 - a['kept']), **_summary(a['routed'], f),
              'experts': [_summary(a['routed'], f, rows=[j]) for j in range(e)]}
    if 'shared' in a:
      out[i]['shared'] = _summary(a['shared'], ffn.shared.wi.shape[-1])
  return out


# ------------------------------------------------------------ parameter accounting

def _paths(tree) -> dict[tuple, object]:
  """{path of keys from the root: leaf}; a Variable's trailing 'value' is dropped and
  None leaves are kept (masks use None for leaves that are not pruned)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)
  return {plain_path(path): leaf for path, leaf in flat}


def _param_table(model):
  """[(path, array, kind, active share (k, E) or 1)] for every nnx.Param of the model.

  kind: embedding | attention | ffn | router | experts | shared | norm | other.
  """
  modules = {p: n for p, n in nnx.iter_graph(model)
             if isinstance(n, (Attention, DenseFFN, MoE, RMSNorm))}
  rows = []
  for path, leaf in _paths(nnx.state(model, nnx.Param)).items():
    kind, share = 'other', (1, 1)
    if path[:1] in (('embed',), ('unembed',)):
      kind = 'embedding'
    for n in range(len(path) - 1, -1, -1):     # innermost module holding the param
      mod = modules.get(path[:n])
      if isinstance(mod, MoE):
        kind = {'router': 'router', 'experts': 'experts', 'shared': 'shared'}.get(
            path[n], 'other')
        if kind == 'experts':   # stacked [E, ...]: a token uses K of them
          share = (mod.settings.k, mod.num_experts)
        break
      if mod is not None:
        kind = {Attention: 'attention', DenseFFN: 'ffn', RMSNorm: 'norm'}[type(mod)]
        # A DenseFFN inside an MoE is its shared expert: keep looking outwards.
        if not any(isinstance(modules.get(path[:m]), MoE) for m in range(n)):
          break
    rows.append((path, leaf, kind, share))
  return rows


def param_counts(model, masks=None) -> dict:
  """Parameter counts of a model's nnx.Params (router biases and other state excluded).

  masks: optional pytree shaped like nnx.state(model, nnx.Param) with bool arrays (True
  = kept) or None (leaf not pruned), e.g. sparse_jax.pruning.masks(opt_state).
  Returns ints except where noted:
    total, active      all parameters, and those one token uses: an MoE block counts
                       K of its E experts, its router and its shared expert; embeddings
                       are excluded from both (they cost a lookup, not a matmul), as in
                       sparse_jax.models.count_params (expert choice: K is the layer's
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

def flops_per_token(model, seq_len: int) -> dict[str, float]:
  """Forward FLOPs per token of a TransformerLM, by part, from its parameters.

  A matmul with a [in, out] weight costs 2*in*out per token (multiply and add); only the
  K routed experts a token uses count, plus the router and any shared expert. Attention
  scores (QK^T and AV) cost 4*seq_len*D per token and layer: the full L x L product the
  XLA kernel computes, not the causal half. Norms, activations, softmax, RoPE, routing
  bookkeeping and the embedding lookup are not counted (O(D + F) per token against
  O(D * F) for the matmuls). Agrees exactly with sparse_jax.models.flops_per_token.

  Returns attention_proj, attention_scores, ffn, experts, shared, router, output,
  other (2x any other matmul weight), forward (their sum), train (3x forward: the
  backward pass costs two forwards), and forward_nonzero: the forward with every
  weight matrix counted by its non-zero entries (what a sparse kernel could skip to;
  experts at K/E of their non-zeros), attention scores unchanged.
  """
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
  forward = sum(parts.values())
  return {**parts, 'forward': forward, 'train': 3.0 * forward,
          'forward_nonzero': nonzero + parts['attention_scores']}
