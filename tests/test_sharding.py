"""Mesh construction, placement and the multi-process path."""
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec as P

import sparse_jax as sj


def test_make_mesh_sizes_and_rest():
  m = sj.sharding.make_mesh(data=-1, expert=4)
  assert dict(m.shape) == {'data': 2, 'expert': 4, 'model': 1}
  assert all(t == AxisType.Auto for t in m.axis_types)
  m = sj.sharding.make_mesh(data=2, expert=2, model=-1, axis_types='explicit')
  assert m.shape['model'] == 2 and all(t == AxisType.Explicit for t in m.axis_types)
  m = sj.sharding.make_mesh(data=1, expert=1, devices=jax.devices()[:1])
  assert m.size == 1


@pytest.mark.parametrize('kwargs,words', [
    (dict(data=3, expert=2), ['6', '8 devices']),
    (dict(data=-1, expert=3), ['3', '8 devices']),
    (dict(data=-1, expert=-1), ['at most one -1']),
    (dict(data=0, expert=8), ['data=0']),
    (dict(data=8, axis_types='manual'), ["'manual'"]),
])
def test_make_mesh_errors(kwargs, words):
  with pytest.raises(ValueError) as err:
    sj.sharding.make_mesh(**kwargs)
  for w in words:
    assert w in str(err.value), (w, str(err.value))


def test_put_batch_and_params():
  mesh = sj.sharding.make_mesh(data=2, expert=4)
  x = sj.sharding.put_batch(np.zeros((8, 3, 5), np.float32), mesh)
  assert x.sharding.spec == P(('data', 'expert'))
  assert x.addressable_shards[0].data.shape == (1, 3, 5)
  layer = sj.moe.MoE(4, 8, 8)                          # built without a mesh
  sj.sharding.put_params(layer, mesh)
  assert layer.experts.wi[...].sharding.spec == P('expert', None, None)
  assert layer.router.kernel[...].sharding.spec == P(None, None)


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


# The trainer's two-process test (tests/test_train.py) covers the default tier.
@pytest.mark.slow
def test_two_processes_match_single_device(tmp_path):
  """2 processes x 4 CPU devices, gloo collectives, vs the single-device reference."""
  worker = pathlib.Path(__file__).with_name('_multiprocess_worker.py')
  out = tmp_path / 'y.npy'
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  procs = [subprocess.Popen([sys.executable, str(worker), str(port), str(i), '2', str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True) for i in range(2)]
  logs = [p.communicate(timeout=300)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), '\n'.join(logs)
  ref = sj.moe.MoE(16, 32, 8, k=2, capacity_factor=1.0, group_size=8, rngs=nnx.Rngs(3))
  x = np.random.default_rng(0).normal(size=(8, 8, 16)).astype(np.float32)
  y0, aux0 = ref(x)
  assert float(aux0['dropped_fraction']) > 0
  assert f"dropped {float(aux0['dropped_fraction'])}" in logs[0]
  np.testing.assert_allclose(np.load(out), y0, atol=1e-5)
