"""What the command lines share: the process setup (cli.py)."""
import os
import subprocess
import sys

import pytest

REALLOCATE = '''
import resource, numpy as np
from sparse_jax import cli
applied = cli.keep_freed_memory()
def touch():
  a = np.ones(1 << 24)                      # 128 MiB: its own mapping under glibc's defaults
  del a
touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
touch()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
'''


@pytest.mark.parametrize('keep', ['1', '0'])
def test_freed_memory_is_reused_without_page_faults(keep):
  """With keep_freed_memory a buffer allocated again reuses pages already mapped (no page
  faults); SPARSE_JAX_KEEP_FREED_MEMORY=0 leaves glibc's defaults, where a fresh mapping
  faults each page in again (fewer faults with transparent huge pages, never 0)."""
  out = subprocess.run([sys.executable, '-c', REALLOCATE], capture_output=True, text=True,
                       check=True, env=dict(os.environ, SPARSE_JAX_KEEP_FREED_MEMORY=keep))
  applied, faults = out.stdout.split()
  if keep == '1':
    assert (applied, int(faults)) == ('True', 0)
  else:
    assert applied == 'False' and int(faults) > 0
