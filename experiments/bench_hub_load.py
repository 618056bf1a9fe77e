"""What loading a Hugging Face checkpoint costs: peak resident memory next to the file
size, and the load time, for a random Mixtral checkpoint of about 1 GB loaded with FSDP
on 8 simulated CPU devices (sparse_jax.hub.load_hf(..., mesh, fsdp=True)).

  python experiments/bench_hub_load.py --out experiments/results       # ~1.1 GB folder
  python experiments/bench_hub_load.py --quick                         # a few MB (tests)

The folder is written first (float32 safetensors shards of at most 256 MB, one tensor at a
time). The load runs in a fresh process, so its peak resident set (ru_maxrss) is the
load's own: the process after importing JAX and starting its devices (the baseline),
plus the parameters (on CPU devices they are host memory: one copy, split over the 8
devices by FSDP), plus whatever the reading holds on top. A loader that read the whole
file before placing it would need about two copies.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

import common

SIZES = {'full': dict(vocab=32000, d_model=1024, layers=4, experts=8, d_ff=2048, heads=16),
         'quick': dict(vocab=256, d_model=64, layers=2, experts=8, d_ff=64, heads=4)}


def write_folder(folder: pathlib.Path, size: dict) -> int:
  """A random MixtralForCausalLM folder (config.json, sharded safetensors); its bytes."""
  import numpy as np
  from sparse_jax import hub
  from sparse_jax.config import base_config, model_spec
  from sparse_jax.hub import safetensors as st
  from sparse_jax.hub.families import FAMILIES
  c = base_config()
  c.model.update(vocab_size=size['vocab'], d_model=size['d_model'], num_layers=size['layers'],
                 num_heads=size['heads'], num_kv_heads=size['heads'] // 2,
                 d_ff=size['d_ff'], activation='swiglu', tie_embeddings=False,
                 architecture='MixtralForCausalLM')
  c.moe.update(num_experts=size['experts'], k=2, dispatch='dropless', moe_every=1,
               moe_offset=0, normalize_weights=True)
  spec = model_spec(c)
  family = FAMILIES[spec.architecture]
  shapes, _ = hub.loading._variable_shapes(spec)
  rng = np.random.default_rng(0)
  tensors = []
  for path, source in family.tensors(spec).items():
    for name, shape in source.expected(shapes[path]).items():
      tensors.append(st.Tensor(name, shape, np.float32, lambda s=shape: rng.standard_normal(
          s, np.float32) * 0.02))
  folder.mkdir(parents=True)
  st.write(folder, tensors, max_shard_bytes=256 << 20)
  (folder / 'config.json').write_text(json.dumps(family.hf_config(spec), indent=1))
  return sum(p.stat().st_size for p in folder.glob('*.safetensors'))


def _rss_bytes() -> int:
  for line in pathlib.Path('/proc/self/status').read_text().splitlines():
    if line.startswith('VmRSS:'):
      return int(line.split()[1]) * 1024
  return 0


def child(folder: str) -> None:
  """Runs in its own process: load with FSDP on 8 devices, print the measurements."""
  import jax
  from sparse_jax import hub, sharding
  common.setup_devices(8)
  mesh = sharding.make_mesh(8, 1)
  jax.block_until_ready(jax.device_put(0.0))
  baseline = _rss_bytes()
  start = time.perf_counter()
  model, _ = hub.load_hf(folder, mesh=mesh, fsdp=True)
  from flax import nnx
  params = nnx.state(model, nnx.Param)
  jax.block_until_ready(params)
  seconds = time.perf_counter() - start
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  total = sum(x.nbytes for x in jax.tree.leaves(params))
  print(json.dumps(dict(load_seconds=seconds, baseline_rss=baseline, peak_rss=peak,
                        param_bytes=total,
                        param_bytes_per_device=sharding.bytes_per_device(params))))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--quick', action='store_true')
  ap.add_argument('--out', type=pathlib.Path, default=None,
                  help='write bench_hub_load.{md,csv,json} here')
  ap.add_argument('--child', default=None, help=argparse.SUPPRESS)
  a = ap.parse_args(argv)
  if a.child:
    return child(a.child)
  common.setup_devices(8)
  meta = common.provenance([0], source=None)
  with tempfile.TemporaryDirectory() as tmp:
    folder = pathlib.Path(tmp) / 'mixtral'
    file_bytes = write_folder(folder, SIZES['quick' if a.quick else 'full'])
    r = subprocess.run([sys.executable, __file__, f'--child={folder}'], capture_output=True,
                       text=True, env=common.cpu_env())
  if r.returncode:
    raise SystemExit(f'the loading process failed:\n{r.stderr}')
  m = json.loads(r.stdout.strip().splitlines()[-1])
  row = dict(file_bytes=file_bytes, **m, peak_over_baseline=m['peak_rss'] - m['baseline_rss'],
             extra_over_file=(m['peak_rss'] - m['baseline_rss']) / file_bytes)
  md = common.header('Loading a Hugging Face checkpoint: memory and time', meta)
  md += ('A random MixtralForCausalLM folder (float32 safetensors shards), loaded with '
         '`sparse_jax.hub.load_hf(folder, mesh=data 8, fsdp=True)` in a fresh process on 8 '
         'simulated CPU devices. On CPU devices the parameters are host memory, so the peak '
         'above the baseline holds one copy of the model; reading a whole file before '
         'placing it would hold about two.\n\n')
  md += common.table(
      ['file bytes', 'parameter bytes', 'per device', 'baseline RSS', 'peak RSS',
       'peak - baseline', '(peak - baseline) / file', 'load s'],
      [[f"{row['file_bytes']:,}", f"{row['param_bytes']:,}",
        f"{row['param_bytes_per_device']:,}", f"{row['baseline_rss']:,}",
        f"{row['peak_rss']:,}", f"{row['peak_over_baseline']:,}",
        f"{row['extra_over_file']:.2f}", f"{row['load_seconds']:.1f}"]])
  print(md)
  if a.out:
    common.write_results('bench_hub_load', md, [row], meta, a.out)
  return row


if __name__ == '__main__':
  main()
