"""Train-step timing and memory of specs, for the benchmarks and the main job.

  - `compiled_step(spec)`: the step compiled ahead of time, its state, a batch of random
    tokens on the mesh, and steps.memory of it;
  - `step_times(specs)` / `interleaved_times(runs)`: median step times, the specs run in
    turn so drift hits all of them alike.
"""
from __future__ import annotations

import statistics
import time

import jax
import numpy as np

from sparse_jax import sharding
from sparse_jax.config import Spec
from sparse_jax.training import loop, steps


def compiled_step(spec: Spec) -> list:
  """[train step compiled ahead of time, its state, a batch of random tokens on spec's
  mesh, steps.memory of it] (the batch is already on the mesh: model time, not input)."""
  mesh = loop.make_mesh(spec)
  s = steps.build(spec, mesh)
  t = spec.train
  tokens = np.random.default_rng(0).integers(0, 256, (t.batch_size, t.seq_len + 1))
  batch = sharding.put_batch({'inputs': tokens[:, :-1].astype(np.int32),
                              'targets': tokens[:, 1:].astype(np.int32)}, mesh)
  compiled = s.train.lower(s.state, batch).compile()
  return [compiled, s.state, batch, steps.memory(s, compiled)]


def interleaved_times(runs: dict[str, list], n: int) -> dict[str, float]:
  """Median seconds per step of each compiled_step run, run in turn, after 2 warm-ups."""
  times = {name: [] for name in runs}
  for it in range(n + 2):
    for name, r in runs.items():
      t0 = time.perf_counter()
      r[1], m = r[0](r[1], r[2])
      jax.block_until_ready(m)
      if it >= 2:
        times[name].append(time.perf_counter() - t0)
  return {name: statistics.median(t) for name, t in times.items()}


def step_times(specs: dict[str, Spec], n: int = 8) -> dict[str, float]:
  """Median seconds per train step of each spec, interleaved (see interleaved_times)."""
  return interleaved_times({name: compiled_step(s) for name, s in specs.items()}, n)


def timed_steps(preset: str) -> int:
  """Timed steps per model in step_times: few for the tests."""
  return 3 if preset == 'smoke' else 8
