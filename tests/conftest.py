"""Every test sees 8 simulated CPU devices (set before jax is imported)."""
import os
import pathlib

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# The test processes (and their subprocesses) keep glibc's malloc defaults: each runs many
# programs of many sizes, where a heap that never shrinks could grow with fragmentation.
os.environ.setdefault('SPARSE_JAX_KEEP_FREED_MEMORY', '0')
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


SLOW_TESTS = pathlib.Path(__file__).with_name('slow_tests.txt')


@pytest.hookimpl(tryfirst=True)          # before -m selects on the markers
def pytest_collection_modifyitems(config, items):
  """Marks the tests named in tests/slow_tests.txt slow. A line naming no test of a file
  collected whole is an error: a renamed test would otherwise return to the default tier."""
  listed = {line.strip() for line in SLOW_TESTS.read_text().splitlines()
            if line.strip() and not line.startswith('#')}
  found = set()
  for item in items:
    if item.nodeid in listed:
      item.add_marker(pytest.mark.slow)
      found.add(item.nodeid)
  if all('::' not in a for a in config.args):
    files = {item.nodeid.split('::')[0] for item in items}
    stale = sorted(n for n in listed - found if n.split('::')[0] in files)
    if stale:
      raise pytest.UsageError(f'{SLOW_TESTS} names {len(stale)} test(s) that do not exist, '
                              f'e.g. {stale[0]}; rename or remove those lines')
