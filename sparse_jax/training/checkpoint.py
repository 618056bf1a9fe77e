"""Orbax checkpoints of a run: the (model, optimizer) state, the data position, the config.

Typed PRNG keys are stored as raw key data (orbax cannot store key arrays) and wrapped
again on restore. Restores are placed with the shardings of the state they fill, so a
run resumes on another mesh, with or without FSDP, on another number of devices. The
data position is the iterator's state as JSON: every process reads the same global
batch (sparse_jax.data.pipeline), so one state serves any process count.
"""
from __future__ import annotations

import pathlib

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from sparse_jax.config import from_saved, resolve
from sparse_jax.training.steps import build


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


def manager(workdir: pathlib.Path, *, keep: int | None = None) -> ocp.CheckpointManager:
  """The workdir's checkpoint manager; keep=None opens it read-only."""
  options = None if keep is None else ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=True)
  return ocp.CheckpointManager((workdir / 'checkpoints').absolute(), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state, data_iterator,
         config: ml_collections.ConfigDict, *, wait: bool = False) -> None:
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(_storable(state)),
      data=ocp.args.JsonSave(data_iterator.get_state()),
      config=ocp.args.JsonSave(config.to_dict())))
  if wait:
    mngr.wait_until_finished()


def restore(mngr: ocp.CheckpointManager, step: int, state, shardings, data_iterator):
  """The state saved at `step`, placed like `state`; the iterator is moved in place."""
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(_abstract(state, shardings)),
      data=ocp.args.JsonRestore()))
  data_iterator.set_state(restored.data)
  return _rewrap_keys(state, restored.state)


def saved_config(mngr: ocp.CheckpointManager, step: int) -> ml_collections.ConfigDict:
  saved = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  return from_saved(saved['config'])


class NoCheckpointError(ValueError):
  """A workdir that holds no checkpoint to load."""


def load_model(run_dir: pathlib.Path, mesh):
  """(config, spec, model) of a training run's latest checkpoint, placed on `mesh`."""
  mngr = manager(run_dir)
  step = mngr.latest_step()
  if step is None:
    raise NoCheckpointError(f'no checkpoint in {run_dir / "checkpoints"} to load a model '
                            'from; train it first')
  config = saved_config(mngr, step)
  spec = resolve(config, mesh.size)
  steps = build(spec, mesh)
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(_abstract(steps.state, steps.shardings))))
  model, _ = nnx.merge(steps.graphdef, _rewrap_keys(steps.state, restored['state']))
  mngr.close()
  return config, spec, model
