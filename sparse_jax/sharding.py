"""Device meshes and placement: axes 'data', 'expert' and 'model'.

Tokens are sharded over ('data', 'expert') jointly along the batch axis; expert weights
over 'expert' on their leading axis; 'model' is for tensor parallelism.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXES = ('data', 'expert', 'model')
TOKEN_AXES = ('data', 'expert')


def mesh_sizes(data: int = -1, expert: int = 1, model: int = 1, *,
               num_devices: int) -> dict[str, int]:
  """{'data', 'expert', 'model'} sizes with the one -1 ("the rest") filled in.

  Raises ValueError naming the sizes when they cannot cover num_devices exactly.
  """
  sizes = {'data': data, 'expert': expert, 'model': model}
  free = [a for a, v in sizes.items() if v == -1]
  bad = [f'{a}={v}' for a, v in sizes.items() if v != -1 and v < 1]
  if bad or len(free) > 1:
    what = ', '.join(bad) if bad else f'{len(free)} axes set to -1'
    raise ValueError(f'mesh sizes must be positive, with at most one -1 ("the rest"); '
                     f'got {what} in {sizes}')
  fixed = math.prod(v for v in sizes.values() if v != -1)
  if free:
    if num_devices % fixed:
      raise ValueError(f'mesh sizes {sizes}: the fixed axes multiply to {fixed}, which '
                       f'does not divide the {num_devices} devices')
    sizes[free[0]] = num_devices // fixed
  total = math.prod(sizes.values())
  if total != num_devices:
    raise ValueError(f'mesh sizes {sizes} multiply to {total} but there are '
                     f'{num_devices} devices; make them match or use -1 for one axis')
  return sizes


def make_mesh(data: int = -1, expert: int = 1, model: int = 1, *,
              devices: Sequence[jax.Device] | None = None,
              axis_types: str = 'auto') -> Mesh:
  """Mesh with axes ('data', 'expert', 'model'); one size may be -1 ("the rest").

  axis_types: 'auto' (GSPMD propagates shardings; our default) or 'explicit'
  (jax's sharding-in-types). Raises ValueError when the sizes do not fit the devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_sizes(data, expert, model, num_devices=len(devices))
  if axis_types not in ('auto', 'explicit'):
    raise ValueError(f"axis_types={axis_types!r}; use 'auto' or 'explicit'.")
  kind = AxisType.Auto if axis_types == 'auto' else AxisType.Explicit
  shape = tuple(sizes[a] for a in AXES)
  return jax.make_mesh(shape, AXES, axis_types=(kind,) * len(AXES), devices=devices)


def axis_size(mesh: Mesh | None, name: str) -> int:
  """Size of a mesh axis; 1 when there is no mesh or no such axis."""
  if mesh is None or name not in mesh.axis_names:
    return 1
  return mesh.shape[name]


def token_axes(mesh: Mesh | None) -> tuple[str, ...]:
  """Mesh axes the token batch is split over (those of 'data', 'expert' present)."""
  if mesh is None:
    return ()
  return tuple(a for a in TOKEN_AXES if a in mesh.axis_names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batch axis over ('data', 'expert'); every other axis replicated."""
  return NamedSharding(mesh, P(token_axes(mesh) or None))


def reshard(x: jax.Array | None, mesh: Mesh, spec: P) -> jax.Array | None:
  """Give x the sharding `spec` on `mesh`, for meshes of either axis type.

  Explicit axes carry shardings in types, so they need jax.sharding.reshard; Auto axes
  take a sharding constraint (a device_put outside jit).
  """
  if x is None:
    return None
  sharding = NamedSharding(mesh, spec)
  if any(t == AxisType.Explicit for t in mesh.axis_types):
    return jax.sharding.reshard(x, sharding)
  return jax.lax.with_sharding_constraint(x, sharding)


def put_batch(batch: Any, mesh: Mesh) -> Any:
  """Place a pytree of host arrays [B, ...] on the mesh, batch axis sharded.

  With several processes each passes its own slice of the global batch.
  """
  sharding = batch_sharding(mesh)
  shards = math.prod(mesh.shape[a] for a in token_axes(mesh))
  for x in jax.tree.leaves(batch):
    rows = np.shape(x)[0] * jax.process_count() if np.ndim(x) else 0   # the global batch
    if rows % shards or not rows:
      raise ValueError(f'a batch of {rows} rows cannot be split over the {shards} devices '
                       f'of the mesh axes {token_axes(mesh)} ({dict(mesh.shape)}); give a '
                       f'multiple of {shards} rows')
  if jax.process_count() > 1:
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)
  return jax.device_put(batch, sharding)


def spec_for(mesh: Mesh, names: Sequence[str | None] | None) -> P:
  """Partition names from parameter metadata -> a spec valid on this mesh."""
  if not names:
    return P()
  return P(*(n if n in mesh.axis_names else None for n in names))


def fsdp_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """`spec` with 'data' added on the largest unsplit axis whose size it divides (FSDP).

  Arrays of fewer than 2 dims (norm scales, biases, counters) stay as they are; so does
  everything when the data axis has size 1. Raises ValueError when no free axis of a
  larger array divides the data axis.
  """
  n = axis_size(mesh, 'data')
  if n == 1 or len(shape) < 2:
    return spec
  names = tuple(spec) + (None,) * (len(shape) - len(spec))
  free = [i for i, name in enumerate(names) if name is None and shape[i] % n == 0]
  if not free:
    raise ValueError(f'no unsplit dimension of shape {tuple(shape)} (partition {names}) '
                     f'is divisible by the data axis size {n}')
  i = max(free, key=lambda i: shape[i])
  return P(*names[:i], 'data', *names[i + 1:])


def state_shardings(state, mesh: Mesh, *, fsdp: bool = False):
  """NamedShardings for every leaf of an nnx state, from its partition metadata.

  fsdp=True also splits each array of 2 or more dims over 'data' (fsdp_spec); a
  ValueError then names the first array that cannot be split.
  """
  specs = jax.tree.map(lambda s: spec_for(mesh, tuple(s)), nnx.get_partition_spec(state))
  if fsdp:
    def add_data(path, spec, x):
      try:
        return fsdp_spec(spec, x.shape, mesh)
      except ValueError as e:
        raise ValueError(f'{_path_str(path)}: {e}') from None
    specs = jax.tree_util.tree_map_with_path(add_data, specs, state)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs)


def _path_str(path) -> str:
  keys = [getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k))) for k in path]
  return '.'.join(str(k) for k in keys if k != 'value')


def bytes_per_device(tree) -> int:
  """Bytes the most loaded device holds of a pytree of placed arrays (from their
  shardings: replicas count on every device that holds one)."""
  per_device = {}
  for x in jax.tree.leaves(tree):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      itemsize = jax.random.key_data(x).dtype.itemsize * math.prod(
          jax.random.key_data(x).shape[x.ndim:])
    else:
      itemsize = x.dtype.itemsize
    for device, index in x.sharding.devices_indices_map(x.shape).items():
      n = math.prod(len(range(*i.indices(d))) for i, d in zip(index, x.shape))
      per_device[device] = per_device.get(device, 0) + n * itemsize
  return max(per_device.values(), default=0)


def varying_axes(a) -> frozenset:
  """The manual mesh axes an array (or an array type) varies over inside shard_map; empty
  outside it."""
  t = a if isinstance(a, jax.core.ShapedArray) else jax.typeof(a)
  return frozenset(t.manual_axis_type.varying)


def vary(a: jax.Array, axes) -> jax.Array:
  """`a` made to vary over `axes` too: inside shard_map, a loop's carries and a cond's
  branch outputs must agree on the axes they vary over."""
  missing = tuple(sorted(frozenset(axes) - varying_axes(a)))
  return jax.lax.pcast(a, missing, to='varying') if missing else a


def put_params(module: nnx.Module, mesh: Mesh) -> None:
  """Move a module's variables onto the mesh, following their partition metadata."""
  state = nnx.state(module)
  nnx.update(module, jax.device_put(state, state_shardings(state, mesh)))


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """jax.distributed.initialize, with gloo collectives when the platform is CPU.

  Arguments left as None are auto-detected on TPU/GPU clusters (SLURM, GKE, ...).
  """
  # Only the CPU client reads this; without it CPU processes cannot run collectives.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
