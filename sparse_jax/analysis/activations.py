"""Activation-sparsity probes: how many FFN hidden units a model really uses.

Shape legend: B batch, L length, T = B*L tokens, D d_model, F d_ff, E experts,
K experts per token, N rows (tokens an expert processed, padded), W windows.

activation_sparsity(model, tokens) runs the model once with each block sowing its FFN
input (Block.sow_ffn_input), routes MoE inputs with the layer's own MoE.route, and
computes every FFN's hidden units with layers.ffn_hidden: per FFN block the zero /
near-zero hidden units, dead neurons and the active union over token windows.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_jax import dispatch as dispatch_lib
from sparse_jax.layers import ffn_hidden
from sparse_jax.models.transformer import Block, FFNInput, relayout
from sparse_jax.moe import MoE

DEFAULT_THRESHOLD = 1e-2
DEFAULT_WINDOWS = (1, 16, 256)


# ------------------------------------------------------------------ pure statistics

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
  """{block index: the normed input of its FFN [B, L, D]} of a TransformerLM, as sown
  by its blocks during one forward pass."""
  model = relayout(model, False)
  blocks = [b for _, b in nnx.iter_graph(model) if isinstance(b, Block)]
  for b in blocks:
    b.sow_ffn_input = True
  try:
    _, sown = nnx.capture(model, FFNInput)(tokens)
  finally:
    for b in blocks:
      b.sow_ffn_input = False
  return {i: sown['blocks'][i]['ffn_input'].get_value()[0] for i in range(len(model.blocks))}


def _routed_rows(layer: MoE, h: jax.Array):
  """Each expert's tokens, in token order. h [B, L, D] -> (x [E, N, D], count i32[E],
  kept fraction of all choices), from the layer's own plan (MoE.route)."""
  b, l, d = h.shape
  e = layer.num_experts
  plan, c = layer.route(h)                                             # [G, S, K]
  sm = dispatch_lib.slot_map(plan, e, c)
  src, filled = sm.src.reshape(e, -1), sm.filled.reshape(e, -1)        # [E, N]
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
  def stats(ffn, x):                                   # one dense FFN over x [N, D]
    hid = ffn_hidden(ffn.weights(), x, ffn.activation)[None]           # [1, N, F]
    return _stack_stats(hid, jnp.array([hid.shape[1]]), ffn.activation, threshold, windows)

  out = {}
  for i, h in ffn_inputs(model, tokens).items():
    ffn = model.blocks[i].ffn
    if isinstance(ffn, MoE):
      x, count, kept = _routed_rows(ffn, h)
      act = ffn.experts.activation
      hid = jax.vmap(functools.partial(ffn_hidden, activation=act))(ffn.experts.weights(), x)
      out[i] = dict(routed=_stack_stats(hid, count, act, threshold, windows), kept=kept)
      if ffn.shared is not None:
        out[i]['shared'] = stats(ffn.shared, h.reshape(-1, h.shape[-1]))
    else:
      out[i] = dict(dense=stats(ffn, h.reshape(-1, h.shape[-1])))
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
  model = relayout(model, False)
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
