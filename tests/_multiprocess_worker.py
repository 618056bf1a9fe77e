"""One process of the multi-process test: 4 CPU devices each, a (2, 4) mesh across processes.

argv: port, process_id, num_processes, output .npy path. Writes the global output gathered
to this process.
"""
import sys

import jax

port, pid, nproc, out_path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
jax.config.update('jax_num_cpu_devices', 4)
jax.config.update('jax_platforms', 'cpu')

import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

import sparse_jax as sj  # noqa: E402

sj.sharding.initialize_distributed(f'127.0.0.1:{port}', nproc, pid)
assert jax.device_count() == 8 and jax.local_device_count() == 4
mesh = sj.sharding.make_mesh(data=2, expert=4)
layer = sj.moe.MoE(16, 32, 8, k=2, capacity_factor=1.0, mesh=mesh, rngs=nnx.Rngs(3))
x = np.random.default_rng(0).normal(size=(8, 8, 16)).astype(np.float32)
local = x[pid * 4:(pid + 1) * 4]                     # this process's half of the batch
y, aux = nnx.jit(lambda m, x: m(x))(layer, sj.sharding.put_batch(local, mesh))
y = multihost_utils.process_allgather(y, tiled=True)
if pid == 0:
  np.save(out_path, np.asarray(y))
  print('dropped', float(aux['dropped_fraction']))
jax.distributed.shutdown()
