"""When masks are recomputed and to what overall sparsity (pure, host-side Python).

`step` counts optimizer updates from 0. GMP (Zhu & Gupta 2017, initial sparsity 0):
    s(step) = sparsity * (1 - (1 - (step - start_step) / (end_step - start_step))**3)
recomputed at start_step <= step <= end_step with (step - start_step) % update_every == 0,
fixed afterwards. 'one_shot' prunes to `sparsity` once, at start_step. 'dynamic' prunes
to `sparsity` at start_step, then moves entries (dynamic.py) at start_step + k*update_every
while that is < end_step; its sparsity never changes.
"""
from __future__ import annotations

SCHEDULES = ('gmp', 'one_shot', 'dynamic')


def gmp_sparsity(step: int, sparsity: float, start_step: int, end_step: int) -> float:
  """The cubic target at `step` (clamped to [start_step, end_step])."""
  step = min(max(step, start_step), end_step)
  return sparsity * (1 - (1 - (step - start_step) / (end_step - start_step)) ** 3)


def update_steps(schedule: str, start_step: int, end_step: int | None,
                 update_every: int) -> list[int]:
  """The steps at which masks are recomputed, in order."""
  if schedule == 'one_shot':
    return [start_step]
  if schedule == 'dynamic':
    return list(range(start_step, end_step, update_every))
  return list(range(start_step, end_step + 1, update_every))


def target_sparsity(step: int, *, sparsity: float, schedule: str, start_step: int,
                    end_step: int | None) -> float:
  """The sparsity a mask recomputed at `step` aims for (0 before start_step)."""
  if step < start_step:
    return 0.0
  if schedule in ('one_shot', 'dynamic'):
    return sparsity
  return gmp_sparsity(step, sparsity, start_step, end_step)
