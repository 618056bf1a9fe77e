"""Per-weight pruning scores (pure): higher means keep."""
from __future__ import annotations

import jax
import jax.numpy as jnp

METHODS = ('magnitude', 'random', 'saliency')


def element_scores(method: str, weights, grads, leaf_ids, seed: int = 0) -> list:
  """f32 scores shaped like each weight.

  magnitude |w|; saliency |w * g| (first-order Taylor, the grads of this update);
  random: uniform noise from (seed, leaf id), fixed across steps so gradual random
  pruning removes nested sets.
  """
  if method == 'magnitude':
    return [jnp.abs(w.astype(jnp.float32)) for w in weights]
  if method == 'saliency':
    return [jnp.abs(w.astype(jnp.float32) * g.astype(jnp.float32))
            for w, g in zip(weights, grads)]
  if method == 'random':
    key = jax.random.key(seed)
    return [jax.random.uniform(jax.random.fold_in(key, i), w.shape, jnp.float32)
            for w, i in zip(weights, leaf_ids)]
  raise ValueError(f'method={method!r} is unknown; use one of {METHODS}.')
