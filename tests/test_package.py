"""The package itself: the layer library imports no data, checkpoint or plotting stack."""
import subprocess
import sys

HEAVY = ('tensorflow_datasets', 'grain', 'orbax', 'matplotlib', 'qwix', 'tensorboardX')


def test_layer_library_is_light():
  code = ('import sys, sparse_jax as sj\n'
          'import sparse_jax.routing, sparse_jax.dispatch, sparse_jax.moe, sparse_jax.sharding\n'
          'import sparse_jax.pruning, sparse_jax.config, sparse_jax.models, sparse_jax.analysis\n'
          'sj.upcycle\n'
          f'print(sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r})))')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == '[]', out.stdout
