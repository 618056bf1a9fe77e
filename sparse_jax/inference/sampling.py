"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def sample(logits: jax.Array, key: jax.Array, *, temperature: float = 0.0, top_k: int = 0,
           top_p: float = 1.0) -> jax.Array:
  """logits f32[B, V] -> i32[B]. temperature 0 is greedy (argmax; key unused). Otherwise
  logits / temperature, restricted to the top_k largest (0: all) and then to the smallest
  set of most likely tokens whose probability reaches top_p (1: all), sampled with key."""
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if 0 < top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]                      # [B, 1]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1:
    order = jnp.argsort(-logits, axis=-1)
    probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs                        # mass ahead of each
    cut = jnp.take_along_axis(before >= top_p, jnp.argsort(order, axis=-1), axis=-1)
    logits = jnp.where(cut, -jnp.inf, logits)                          # the first stays
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
