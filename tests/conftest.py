"""Every test sees 8 simulated CPU devices (set before jax is imported)."""
import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402

jax.config.update('jax_threefry_partitionable', True)


import pytest  # noqa: E402


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """The embedded corpus, built once per session (or reused from $SPARSE_JAX_DATA)."""
  from sparse_jax import data
  d = os.environ.get('SPARSE_JAX_DATA') or str(tmp_path_factory.mktemp('data'))
  data.prepare('stdlib', d, verbose=False)
  return d
