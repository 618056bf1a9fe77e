"""Orbax checkpoints of a run that verify themselves: the (model, optimizer) state, the data
position, the config, and a digest manifest.

Typed PRNG keys are stored as raw key data (orbax cannot store key arrays) and wrapped
again on restore. Restores are placed with the shardings of the state they fill, so a
run resumes on another mesh, with or without FSDP, on another number of devices. The
data position is the iterator's state as JSON: every process reads the same global
batch (sparse_jax.data.pipeline), so one state serves any process count.

Saves are asynchronous. Once orbax has finalised step N, process 0 writes its digest
manifest, checkpoints/N/digests.json (sparse_jax.digests); only then may rotation remove
older steps. Restores take the newest step that
passes its digests and loads; a step that fails is named in one line and moved aside to
checkpoints/N.corrupt (never deleted; a read-only reader skips it instead). A step
without a manifest (written by older code, or the run was killed between finalising and
digesting it) is accepted if it loads. A sound step whose state has another structure than
the one the command builds (another model, a pruner turned on or off) is refused with
StructureError, which names the first differing tensor; it is not damage and nothing is
moved. A save that fails raises SaveError once noticed (the next step on one process,
else the next save), after removing its partial directory.
"""
from __future__ import annotations

import math
import os
import pathlib
import re
import shutil
import sys
from typing import Callable, TypeVar

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from sparse_jax import digests, sharding
from sparse_jax.config import ConfigError, from_saved, resolve
from sparse_jax.training.steps import build

T = TypeVar('T')


class NoCheckpointError(ValueError):
  """A workdir that holds no checkpoint to load."""


class SaveError(RuntimeError):
  """An asynchronous save failed (disk full, permissions, ...); one-line message."""


class StructureError(ConfigError):
  """A sound checkpoint whose state does not fit the state the command builds."""


def _storable(state):
  """Typed PRNG keys -> raw uint32 data, which orbax can store."""
  return jax.tree.map(lambda x: jax.random.key_data(x)
                      if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x, state)


def _rewrap_keys(template, restored):
  return jax.tree.map(lambda t, r: jax.random.wrap_key_data(r, impl=jax.random.key_impl(t))
                      if jax.dtypes.issubdtype(t.dtype, jax.dtypes.prng_key) else r,
                      template, restored)


def _abstract(state, shardings):
  """What orbax restores into: shapes, dtypes and shardings of the checkpointed state."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      _storable(state), shardings)


def _leaf_name(path) -> str:
  """'0.blocks.1.ffn.wi.value' -> 'model/blocks/1/ffn/wi' (1. is the optimizer)."""
  parts = jax.tree_util.keystr(path, simple=True, separator='/').split('/')
  if parts[-1] == 'value':
    parts = parts[:-1]
  return '/'.join([{'0': 'model', '1': 'optimizer'}.get(parts[0], parts[0])] + parts[1:])


def _shapes(tree) -> dict[str, tuple]:
  return {_leaf_name(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def structure_difference(want: dict, have: dict) -> str | None:
  """The first difference between two {leaf: shape} maps, in words, or None."""
  for name in sorted(set(want) | set(have)):
    if name not in have:
      return f'{name} is in the state this command builds but not in the checkpoint'
    if name not in want:
      return f'{name} is in the checkpoint but not in the state this command builds'
    if want[name] != have[name]:
      return f'{name} has shape {have[name]} in the checkpoint but {want[name]} here'
  return None


def _one_line(e: BaseException) -> str:
  """An exception in one line, its middle cut when long. tensorstore ends the cause
  (e.g. 'No space left on device') with a bracketed spec of the store, spread over lines;
  that is cut first (tensorstore 0.1.x)."""
  text = re.split(r'\s*\[(?:tensorstore_spec|os_error_code|source locations)=', str(e))[0]
  lines = [l.strip() for l in text.splitlines() if l.strip()]
  text = f'{type(e).__name__}: {lines[-1] if lines else ""}'
  return text if len(text) <= 320 else f'{text[:120]} ... {text[-180:]}'


def _check(directory: pathlib.Path) -> str | None:
  """What is wrong with a step's directory, or None. Without a manifest it may still load."""
  if not digests.has_manifest(directory):
    return None if directory.is_dir() and any(directory.iterdir()) else 'is empty'
  return digests.check(directory)


class Checkpoints:
  """The workdir's checkpoints. keep=None opens them read-only (a reader never changes a
  workdir: a bad step is skipped, not moved aside); else at most `keep` verified steps
  are kept."""

  def __init__(self, workdir: pathlib.Path, *, keep: int | None = None):
    self.dir = (pathlib.Path(workdir) / 'checkpoints').absolute()
    self.keep = keep
    self._lead = jax.process_index() == 0
    self._pending = None
    if keep is None:
      options = ocp.CheckpointManagerOptions(read_only=True)
    else:            # rotation is ours: only after the newer step is verified
      options = ocp.CheckpointManagerOptions(
          max_to_keep=None, create=True, enable_async_checkpointing=True,
          cleanup_tmp_directories=True)   # partial saves of a killed run
    self._mngr = ocp.CheckpointManager(self.dir, options=options)

  def steps(self) -> list[int]:
    """Finalised steps, newest first."""
    return sorted(self._mngr.all_steps(), reverse=True)

  def verified(self, step: int) -> bool:
    path = self.dir / str(step)
    return digests.has_manifest(path) and digests.check(path) is None

  # --- restore ---------------------------------------------------------------------------

  def newest(self, load: Callable[[int], T]) -> tuple[int | None, T | None]:
    """(step, load(step)) for the newest step that passes its digests and loads, or
    (None, None). ConfigError from `load` (a refused resume) passes through."""
    for step in self.steps():
      problem = _check(self.dir / str(step))
      if problem is None:
        try:
          return step, load(step)
        except ConfigError:
          raise
        except Exception as e:  # pylint: disable=broad-except  # any unreadable part
          problem = f'cannot be read ({_one_line(e)})'
      self._reject(step, problem)
    return None, None

  def _reject(self, step: int, problem: str):
    where = self.dir / str(step)
    if self.keep is None:
      action = 'skipped it (this command only reads the workdir)'
    else:
      aside = where.with_name(f'{step}.corrupt')
      n = 1
      while aside.exists():
        aside, n = where.with_name(f'{step}.corrupt.{n}'), n + 1
      if self._lead:
        os.rename(where, aside)
      self._sync('reject')
      action = f'moved it to {aside.name} for inspection'
    if self._lead:
      print(f'warning: checkpoint step {step} in {self.dir} {problem}; {action} and '
            'fell back to the previous step', file=sys.stderr, flush=True)
    self._mngr.reload()

  def config(self, step: int) -> ml_collections.ConfigDict:
    saved = self._mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return from_saved(saved['config'])

  def restore(self, step: int, state, shardings, data_iterator=None):
    """The state saved at `step`, placed like `state`; the iterator is moved in place.
    StructureError, before anything is read, when the step holds another structure."""
    stored = ocp.StandardCheckpointHandler().metadata(self.dir / str(step) / 'state')
    difference = structure_difference(_shapes(_storable(state)), _shapes(stored))
    if difference is not None:
      raise StructureError(
          f'checkpoint step {step} in {self.dir} holds another model or optimizer state than '
          f'this config builds ({difference}): resume it with the config it was written '
          'with, or use a new --workdir')
    items = {'state': ocp.args.StandardRestore(_abstract(state, shardings))}
    if data_iterator is not None:
      items['data'] = ocp.args.JsonRestore()
    restored = self._mngr.restore(step, args=ocp.args.Composite(**items))
    if data_iterator is not None and restored['data']:    # {}: saved at the data's start
      data_iterator.set_state(restored['data'])
    return _rewrap_keys(state, restored['state'])

  # --- save ------------------------------------------------------------------------------

  def save(self, step: int, state, data_iterator, config: ml_collections.ConfigDict, *,
           wait: bool = False) -> None:
    self.settle()
    try:
      self._mngr.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(_storable(state)),
          data=ocp.args.JsonSave({} if data_iterator is None else data_iterator.get_state()),
          config=ocp.args.JsonSave(config.to_dict())))
    except Exception as e:  # pylint: disable=broad-except  # raised before the async part
      self._failed(step, e)
    self._pending = step
    if wait:
      self.settle()

  def poll(self) -> None:
    """Once per step: settle a save whose background work has ended. One process only:
    elsewhere processes could notice at different steps, so it waits for the next save."""
    if (self._pending is not None and jax.process_count() == 1
        and not self._mngr.is_saving_in_progress()):
      self.settle()

  def settle(self) -> None:
    """Waits for the pending save; then digests it and rotates, or raises SaveError."""
    if self._pending is None:
      return
    step, self._pending = self._pending, None
    try:
      self._mngr.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      self._failed(step, e)
    if self._lead:
      try:
        digests.write_manifest(self.dir / str(step))
      except OSError as e:        # e.g. the disk filled up after orbax finalised the step
        self._failed(step, e)
    self._sync('digests')
    verified = [s for s in self.steps() if digests.has_manifest(self.dir / str(s))]
    if len(verified) > self.keep:
      for s in self.steps():
        if s < verified[self.keep - 1]:
          self._mngr.delete(s)

  def _failed(self, step: int, e: Exception):
    if self._lead:                                     # no partial directory left behind
      for partial in self.dir.glob(f'{step}.orbax-checkpoint-tmp*'):
        shutil.rmtree(partial, ignore_errors=True)
    self._mngr.reload()
    good = self.newest_verified()
    raise SaveError(f'saving checkpoint step {step} to {self.dir} failed: {_one_line(e)}; '
                    f'the newest verified checkpoint is '
                    f'{"step " + str(good) if good is not None else "none"}') from e

  def newest_verified(self) -> int | None:
    return next((s for s in self.steps() if self.verified(s)), None)

  def close(self) -> None:
    try:
      self.settle()
    finally:
      self._mngr.close()

  @staticmethod
  def _sync(name: str):
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'sparse_jax.checkpoint.{name}')


def fit_mesh(config: ml_collections.ConfigDict, mesh=None):
  """(config on `mesh`, mesh): the run's config with its mesh replaced by `mesh`'s sizes
  (default: every device here, the expert axis as large as the run's that divides them),
  and the batch rounded up to split over it. Loading compiles no training step, so only
  the model has to fit: a run trained with mesh.expert=8 loads on one device."""
  c = config.copy_and_resolve_references()
  if mesh is None:
    n = jax.device_count()
    expert = math.gcd(max(c.mesh.expert, 1), c.moe.num_experts or 1, n)
    mesh = sharding.make_mesh(n // expert, expert, 1)
  sizes = {a: sharding.axis_size(mesh, a) for a in ('data', 'expert', 'model')}
  c.mesh.update(**sizes)
  c.train.microbatches = 1
  c.train.batch_size = math.lcm(c.train.batch_size, sizes['data'] * sizes['expert'])
  return c, mesh


def load_model(run_dir: pathlib.Path, mesh=None):
  """(config, spec, model) of a training run's newest good checkpoint, placed on `mesh`
  (any mesh the model fits, fit_mesh; default all devices here). Reads only: the run's
  workdir is left as it is."""
  if not (pathlib.Path(run_dir) / 'checkpoints').is_dir():
    raise NoCheckpointError(f'no checkpoint in {run_dir / "checkpoints"} to load a model '
                            'from; train it first')
  ckpts = Checkpoints(run_dir)

  def load(step):
    config = ckpts.config(step)
    fitted, on = fit_mesh(config, mesh)
    spec = resolve(fitted, on.size)
    steps = build(spec, on)
    model, _ = nnx.merge(steps.graphdef, ckpts.restore(step, steps.state, steps.shardings))
    return config, spec, model

  step, loaded = ckpts.newest(load)
  ckpts.close()
  if step is None:
    raise NoCheckpointError(f'no readable checkpoint in {run_dir / "checkpoints"} to load a '
                            'model from; train it first')
  return loaded
