"""Parameter creation shared by every module: init scale, dtype, partition names."""
from __future__ import annotations

from typing import Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from sparse_jax.sharding import spec_for


def weight(key, shape, *, init_scale: float = 1.0, dtype=jax.numpy.float32,
           names: Sequence[str | None], mesh: Mesh | None = None) -> nnx.Param:
  """Truncated-normal kernel with variance init_scale / fan_in (Switch uses 0.1).

  Axis -2 is the input (fan-in) axis, axis -1 the output; leading axes (stacked experts)
  are independent. `names` are the partition names per axis ('expert', 'model' or
  None), kept as metadata; with a mesh the value is placed now, so a module can be built
  with or without `jax.set_mesh`.
  """
  init = jax.nn.initializers.variance_scaling(
      init_scale, 'fan_in', 'truncated_normal', in_axis=-2, out_axis=-1,
      batch_axis=tuple(range(len(shape) - 2)))
  value = init(key, shape, dtype)
  if mesh is not None:
    value = jax.device_put(value, NamedSharding(mesh, spec_for(mesh, names)))
  return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)
