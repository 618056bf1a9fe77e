"""Orbax checkpoints of a run that verify themselves: the (model, optimizer) state, the data
position, the config, and a digest manifest.

Each step also stores the resolved ModelSpec (versioned JSON, ModelSpec.to_json): what
load_model builds, without an optimizer, on any mesh the model fits. Typed PRNG keys are stored as raw key data (orbax cannot store key arrays) and wrapped
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

import dataclasses
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
from sparse_jax.config import ConfigError, ModelSpec, from_saved, model_spec, resolve
from sparse_jax.models import TransformerLM, layout

T = TypeVar('T')


class NoCheckpointError(ValueError):
  """A workdir that holds no checkpoint to load."""


class SaveError(RuntimeError):
  """An asynchronous save failed (disk full, permissions, ...); one-line message."""


class StructureError(ConfigError):
  """A sound checkpoint whose state does not fit the state the command builds."""


def _storable(state):
  """Each step also stores the resolved ModelSpec (versioned JSON, ModelSpec.to_json): what
load_model builds, without an optimizer, on any mesh the model fits. Typed PRNG keys -> raw uint32 data, which orbax can store."""
  return jax.tree.map(lambda x: jax.random.key_data(x)
                      if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x, state)


def _key_impl(t):
  # An abstract key (nnx.eval_shape) has no public accessor for its impl in jax 0.10.
  return jax.random.key_impl(t) if isinstance(t, jax.Array) else t.dtype._impl  # pylint: disable=protected-access


def _rewrap_keys(template, restored):
  return jax.tree.map(lambda t, r: jax.random.wrap_key_data(r, impl=_key_impl(t))
                      if jax.dtypes.issubdtype(t.dtype, jax.dtypes.prng_key) else r,
                      template, restored)


def _abstract(state, shardings):
  """What orbax restores into: shapes, dtypes and shardings of the checkpointed state."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      jax.eval_shape(_storable, state), shardings)


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


def _other_layout(named: dict, spec: ModelSpec, have: dict):
  """When the leaves `named` ({leaf name: ShapeDtypeStruct}) are in the other layer layout
  than a checkpoint of `spec` holding `have` ({leaf name: shape}): (the leaves as that
  checkpoint holds them, replicated; {name: array} as stored -> {name: array} as named).
  Else None."""
  pat = layout.of_spec(spec)
  to_tuple = lambda name: tuple(int(k) if k.isdigit() else k for k in name.split('/'))
  to_name = lambda path: '/'.join(str(k) for k in path)
  flat = {to_tuple(k): x for k, x in named.items()}
  mesh = next(iter(named.values())).sharding.mesh
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  sds = lambda shape, x: jax.ShapeDtypeStruct(shape, x.dtype, sharding=replicated)
  if spec.scan_layers:
    stored = layout.to_scanned(flat, pat, lambda xs: sds((len(xs), *xs[0].shape), xs[0]))
    back = lambda flat: layout.to_unrolled(flat, pat)
  else:
    stored = layout.to_unrolled(flat, pat, lambda x, g: sds(x.shape[1:], x))
    back = lambda flat: layout.to_scanned(flat, pat)
  stored = {to_name(p): x for p, x in stored.items()}
  if stored.keys() == named.keys() or structure_difference(
      {k: tuple(x.shape) for k, x in stored.items()}, have) is not None:
    return None
  return stored, lambda leaves: {to_name(p): x for p, x in back(
      {to_tuple(k): v for k, v in leaves.items()}).items()}


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

  def model_spec(self, step: int) -> ModelSpec:
    """The ModelSpec stored at `step`; from its config for a step written before specs
    were stored (the same resolution, so the same spec)."""
    if not (self.dir / str(step) / 'model').is_dir():
      return model_spec(self.config(step))
    saved = self._mngr.restore(step, args=ocp.args.Composite(model=ocp.args.JsonRestore()))
    return ModelSpec.from_json(saved['model'])

  def restore_model(self, step: int, model_state, shardings):
    """Only the model's part of the state saved at `step` (no optimizer is built or read),
    placed with `shardings`; model_state may be abstract (nnx.eval_shape)."""
    return self._read_state(step, model_state, shardings, 'model')

  def restore(self, step: int, state, shardings, data_iterator=None):
    """The state saved at `step`, placed like `state`; the iterator is moved in place.
    StructureError, before anything is read, when the step holds another structure.
    A step written in the other layer layout (model.scan_layers) is converted."""
    restored = self._read_state(step, state, shardings, 'model or optimizer state')
    if data_iterator is not None:
      data = self._mngr.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))
      if data['data']:                                  # {}: saved at the data's start
        data_iterator.set_state(data['data'])
    return restored

  def _read_state(self, step: int, state, shardings, what: str):
    """Read the leaves of `state` ((model, optimizer), or a model state when what='model')
    from `step`, placed with `shardings`. When the step holds them in the other layer
    layout they are read as stored and moved (models.layout); orbax places what it reads
    replicated first, then the move is placed as asked."""
    prefix = (jax.tree_util.SequenceKey(0),) if what == 'model' else ()
    want = _abstract(state, shardings)
    named = {_leaf_name(prefix + p): x for p, x in jax.tree_util.tree_flatten_with_path(want)[0]}
    stored = ocp.StandardCheckpointHandler().metadata(self.dir / str(step) / 'state')
    have = _shapes(stored)
    if what == 'model':
      have = {k: v for k, v in have.items() if k.startswith('model/')}
    shapes = {k: tuple(x.shape) for k, x in named.items()}
    moved = _other_layout(named, self.model_spec(step), have)
    if moved is None:
      self._refuse(step, shapes, have, what)
      leaves = self._read(step, named, stored)
    else:
      to_stored, back = moved
      leaves = back(self._read(step, to_stored, stored))
      leaves = {k: jax.device_put(leaves[k], x.sharding) for k, x in named.items()}
    flat = jax.tree.unflatten(jax.tree.structure(want), [leaves[k] for k in named])
    return _rewrap_keys(state, flat)

  def _refuse(self, step: int, want: dict, have: dict, what: str):
    difference = structure_difference(want, have)
    if difference is not None:
      raise StructureError(
          f'checkpoint step {step} in {self.dir} holds another {what} than this config '
          f'builds ({difference}): resume it with the config it was written with, or use '
          'a new --workdir')

  def _read(self, step: int, named: dict, stored) -> dict:
    """{leaf name: array} of the leaves `named` ({name: ShapeDtypeStruct with a sharding}).
    Leaves outside it are placeholders: orbax skips them (orbax 0.12)."""
    target = jax.tree_util.tree_map_with_path(
        lambda p, _: named.get(_leaf_name(p), ocp.PLACEHOLDER), stored.tree)
    args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(
        sharding=x.sharding, global_shape=x.shape, dtype=x.dtype)
        if isinstance(x, jax.ShapeDtypeStruct) else ocp.RestoreArgs(), target)
    restored = ocp.PyTreeCheckpointer().restore(
        self.dir / str(step) / 'state', args=ocp.args.PyTreeRestore(target, args))
    return {_leaf_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(restored)[0]
            if x is not ocp.PLACEHOLDER}

  # --- save ------------------------------------------------------------------------------

  def save(self, step: int, state, data_iterator, config: ml_collections.ConfigDict, *,
           wait: bool = False) -> None:
    self.settle()
    try:
      self._mngr.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(_storable(state)),
          data=ocp.args.JsonSave({} if data_iterator is None else data_iterator.get_state()),
          config=ocp.args.JsonSave(config.to_dict()),
          model=ocp.args.JsonSave(model_spec(config).to_json())))
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
    try:        # a save that raised may still have writers running: let them end first,
      self._mngr.wait_until_finished()    # or they write into the directory removed below
    except Exception:  # pylint: disable=broad-except  # the error being reported, again
      pass
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
  (any mesh the model fits, fit_mesh; default all devices here; FSDP as the run had it).
  The model is built from the checkpoint's stored ModelSpec (spec.model) and only its
  parameters are read: no optimizer is built. Reads only: the workdir is left as it is."""
  if not (pathlib.Path(run_dir) / 'checkpoints').is_dir():
    raise NoCheckpointError(f'no checkpoint in {run_dir / "checkpoints"} to load a model '
                            'from; train it first')
  ckpts = Checkpoints(run_dir)

  def load(step):
    config = ckpts.config(step)
    fitted, on = fit_mesh(config, mesh)
    spec = dataclasses.replace(resolve(fitted, on.size), model=ckpts.model_spec(step))
    with jax.set_mesh(on):
      abstract = nnx.eval_shape(lambda: TransformerLM(spec.model, mesh=on, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    try:
      shardings = sharding.state_shardings(state, on, fsdp=spec.fsdp)
    except ValueError:                 # FSDP that this data axis does not divide
      shardings = sharding.state_shardings(state, on)
    return config, spec, nnx.merge(graphdef, ckpts.restore_model(step, state, shardings))

  step, loaded = ckpts.newest(load)
  ckpts.close()
  if step is None:
    raise NoCheckpointError(f'no readable checkpoint in {run_dir / "checkpoints"} to load a '
                            'model from; train it first')
  return loaded
