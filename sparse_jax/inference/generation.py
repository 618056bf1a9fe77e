"""generate(): prefill the prompt into a KV cache in one pass, then decode a token per step.

Shape legend: B batch (prompts), P prompt bucket (the longest prompt, rounded up), T cache
slots (the static maximum length), N new tokens, V vocab.

Prompts of different lengths are left-padded to P; inference.cache.Step gives each row its
RoPE positions and masks its padding. Each (B, P, T, sampling settings, model) compiles
its prefill and decode step once per process and reuses them. On a mesh the batch (and
the cache with it) is split over the token axes ('data', 'expert'), padded with empty rows
to a multiple of their size; the parameters stay where they are.
"""
from __future__ import annotations

import functools
import math
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from sparse_jax import sharding
from sparse_jax.inference.cache import Step
from sparse_jax.inference.sampling import sample


class GenerationError(ValueError):
  """Bad input to generate(), found before anything compiles; one line."""


class Timings(NamedTuple):
  """Wall-clock seconds of one generate call: compile (0 when reused), prefill of the
  prompts' tokens (without padding), and decode of the B*(N - 1) tokens after the first."""
  compile_s: float
  prefill_s: float
  decode_s: float
  prefill_tokens: int
  decode_tokens: int


def _rows(prompt) -> list[list[int]]:
  if isinstance(prompt, (jax.Array, np.ndarray)):
    a = np.asarray(jax.device_get(prompt))
    if a.ndim != 2:
      raise GenerationError(f'prompt must be i32[B, P] or a list of token lists; got shape '
                            f'{a.shape}')
    if not np.issubdtype(a.dtype, np.integer):
      raise GenerationError(f'prompt must hold integer token ids; got dtype {a.dtype}')
    return a.tolist()
  return [list(map(int, r)) for r in prompt]


def check_settings(max_new_tokens: int, *, temperature: float, top_k: int,
                   top_p: float) -> None:
  """GenerationError naming a bad setting and the fix."""
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise GenerationError(f'max_new_tokens={max_new_tokens!r} must be an integer >= 1')
  if temperature < 0:
    raise GenerationError(f'temperature={temperature} must be >= 0 (0 is greedy)')
  if not 0 < top_p <= 1:
    raise GenerationError(f'top_p={top_p} must be in (0, 1] (1 keeps every token)')
  if top_k < 0:
    raise GenerationError(f'top_k={top_k} must be >= 0 (0 keeps every token)')


def check_prompt(prompt, max_new_tokens: int, vocab_size: int,
                 max_len: int | None) -> list[list[int]]:
  """The prompt's rows, or GenerationError naming what is wrong and the fix."""
  rows = _rows(prompt)
  if not rows or any(not r for r in rows):
    raise GenerationError('the prompt is empty: give at least one token in every row '
                          '(a text prompt of at least one byte)')
  bad = sorted({t for r in rows for t in r if not 0 <= t < vocab_size})
  if bad:
    raise GenerationError(f'token id {bad[0]} is outside the vocabulary [0, {vocab_size}); '
                          "encode the prompt with the model's own tokenizer")
  longest = max(map(len, rows))
  if max_len is not None and longest + max_new_tokens > max_len:
    raise GenerationError(f'a prompt of {longest} tokens plus max_new_tokens='
                          f'{max_new_tokens} is past max_len={max_len}: shorten the prompt, '
                          'ask for fewer tokens or raise max_len')
  return rows


def _bucket(longest: int, new: int, max_len: int | None) -> tuple[int, int]:
  """(P, T): the prompt padded to a power of two >= 8 (fewer compilations), and the
  cache slots (max_len, else P + N rounded up to a multiple of 64)."""
  p = max(8, 1 << (longest - 1).bit_length())
  if max_len is not None:
    return min(p, max_len - new), max_len
  return p, -(-(p + new) // 64) * 64


def _mesh(state):
  for x in jax.tree.leaves(state):
    if isinstance(getattr(x, 'sharding', None), NamedSharding):
      return x.sharding.mesh
  return None


def _cache_spec(x, mesh, stacked: bool = False) -> P:
  """The batch over the token axes; [B, T, Hkv, Dh] also heads over 'model'; a scanned
  model's stacked cache [G, ...] keeps its layer axis whole."""
  if stacked:
    return P(None, *_cache_spec(x[0], mesh))
  model = sharding.axis_size(mesh, 'model')
  heads = 'model' if x.ndim == 4 and model > 1 and x.shape[2] % model == 0 else None
  return P(*[sharding.token_axes(mesh) or None, None, heads, None][:x.ndim])


def _prefill(graphdef, state, tokens, start, key, *, length, mesh, settings):
  model = nnx.merge(graphdef, state)
  cache = model.init_cache(tokens.shape[0], length)
  if mesh is not None:
    cache = jax.tree_util.tree_map_with_path(lambda path, x: sharding.reshard(
        x, mesh, _cache_spec(x, mesh, any(getattr(k, 'key', None) == 'stack' for k in path))),
        cache)
  logits, cache = model.decode(tokens, cache, Step(jnp.int32(0), start))
  return sample(logits[:, -1], key, **settings), cache


def _decode(graphdef, state, token, cache, slot, start, key, *, settings):
  model = nnx.merge(graphdef, state)
  logits, cache = model.decode(token[:, None], cache, Step(slot, start))
  return sample(logits[:, -1], key, **settings), cache


_COMPILED: dict = {}


def _compiled(name: str, fn: Callable, key: tuple, *args, donate=()):
  """fn jitted and compiled for these arguments, once per process and key."""
  full = (name, key, jax.tree.structure(args),
          tuple((x.shape, x.dtype, getattr(x, 'sharding', None)) for x in jax.tree.leaves(args)))
  if full not in _COMPILED:
    _COMPILED[full] = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
  return _COMPILED[full]


def generate(model, prompt, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, eos_id: int | None = None,
             max_len: int | None = None,
             on_token: Callable[[np.ndarray], None] | None = None) -> jax.Array:
  """New tokens i32[B, max_new_tokens] after `prompt` (i32[B, P], on the model's mesh or
  not, or a list of B token lists of any lengths). temperature 0 is greedy; otherwise
  sampling with top_k / top_p, reproducible from seed. A row that emits eos_id is padded
  with eos_id after it (generation stops once every row has). max_len: the cache's slots
  (default: the prompt bucket plus max_new_tokens, rounded up). on_token(i32[B]) is
  called with each step's tokens as they are made (for streaming). MoE layers route
  dropless (MoE.generate). Bad input is a GenerationError before anything compiles."""
  return run(model, prompt, max_new_tokens, temperature=temperature, top_k=top_k,
             top_p=top_p, seed=seed, eos_id=eos_id, max_len=max_len, on_token=on_token)[0]


def run(model, prompt, max_new_tokens: int, *, temperature: float = 0.0, top_k: int = 0,
        top_p: float = 1.0, seed: int = 0, eos_id: int | None = None,
        max_len: int | None = None, on_token: Callable | None = None):
  """generate() and its Timings: (tokens i32[B, N], Timings)."""
  check_settings(max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
  rows = check_prompt(prompt, max_new_tokens, model.embed.shape[0], max_len)
  n = max_new_tokens
  p, length = _bucket(max(map(len, rows)), n, max_len)
  graphdef, state = nnx.split(model)
  mesh = _mesh(state)
  shards = math.prod(sharding.axis_size(mesh, a) for a in sharding.token_axes(mesh))
  b = len(rows)
  padded = rows + [[]] * (-b % shards)          # empty rows: every slot is padding
  tokens = np.zeros((len(padded), p), np.int32)
  for i, r in enumerate(padded):
    tokens[i, p - len(r):] = r
  start = np.array([p - len(r) for r in padded], np.int32)
  put = (lambda x: x) if mesh is None else (
      lambda x: jax.device_put(x, sharding.batch_sharding(mesh)))
  tokens, start = put(tokens), put(start)
  settings = dict(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))
  key = jax.random.key(seed)
  static = (graphdef, p, length, tuple(settings.items()))

  t0 = time.perf_counter()
  prefill = _compiled('prefill', functools.partial(_prefill, graphdef, length=length,
                                                   mesh=mesh, settings=settings),
                      static, state, tokens, start, jax.random.fold_in(key, 0))
  t1 = time.perf_counter()
  token, cache = prefill(state, tokens, start, jax.random.fold_in(key, 0))
  token.block_until_ready()
  t2 = time.perf_counter()
  step = None
  if n > 1:
    step = _compiled('decode', functools.partial(_decode, graphdef, settings=settings),
                     static, state, token, cache, jnp.int32(p), start,
                     jax.random.fold_in(key, 1), donate=(2,))
  t3 = time.perf_counter()
  out, done = [], np.zeros(len(padded), bool)
  for i in range(n):
    host = np.asarray(token)
    if eos_id is not None:
      host = np.where(done, eos_id, host)
      done |= host == eos_id
    out.append(host)
    if on_token is not None:
      on_token(host[:b])
    if i == n - 1 or (eos_id is not None and done[:b].all()):
      break
    token, cache = step(state, token, cache, jnp.int32(p + i), start,
                        jax.random.fold_in(key, i + 1))
  t4 = time.perf_counter()
  new = np.stack(out, axis=1)[:b]
  if new.shape[1] < n:                            # every row ended: the rest is eos
    new = np.concatenate([new, np.full((b, n - new.shape[1]), eos_id, np.int32)], axis=1)
  timings = Timings(t1 - t0 + t3 - t2, t2 - t1, t4 - t3, sum(map(len, rows)),
                    b * (len(out) - 1))
  return jnp.asarray(new, jnp.int32), timings

