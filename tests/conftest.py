"""Every test sees 8 simulated CPU devices (set before jax is imported)."""
import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  # Tests compile many equal programs under fresh jit objects, in two xdist workers and in
  # subprocesses (which inherit this): one on-disk cache per session compiles each once.
  import atexit
  import shutil
  import tempfile
  _cache = tempfile.mkdtemp(prefix='sparse_jax_test_xla_cache_')
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ.update(JAX_COMPILATION_CACHE_DIR=_cache,
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0.1')

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
