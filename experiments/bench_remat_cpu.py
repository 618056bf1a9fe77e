"""When per-layer remat saves memory on XLA:CPU: a plain 8-layer MLP (no sparse_jax code).

  python experiments/bench_remat_cpu.py --json experiments/results/bench_remat_cpu.json

Compiled temporary bytes (XLA's memory analysis) of the gradient of 8 residual MLP layers
on 8192 tokens, with and without jax.checkpoint on each layer, under XLA:CPU's default
and memory-aware schedulers, for two inputs: an argument whose gradient is not needed,
and an embedding lookup whose gradient is (as in every language model). Each case is
compiled in its own process, since the scheduler is chosen when the backend starts.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import common

CASE = r'''
import json, sys
import jax, jax.numpy as jnp
remat, embed = sys.argv[1] == '1', sys.argv[2] == '1'

def layer(w, x):
  return x + jax.nn.gelu(x @ w[0]) @ w[1]

f = jax.checkpoint(layer) if remat else layer
ws = [(jnp.ones((256, 1024)), jnp.ones((1024, 256))) for _ in range(8)]
table, tokens, x0 = jnp.ones((256, 256)), jnp.zeros((8192,), jnp.int32), jnp.ones((8192, 256))

def loss(params, tokens, x0):
  ws, table = params
  x = jnp.take(table, tokens, axis=0) if embed else x0
  for w in ws:
    x = f(w, x)
  return (x ** 2).mean()

compiled = jax.jit(jax.grad(loss)).lower((ws, table), tokens, x0).compile()
print(json.dumps(compiled.memory_analysis().temp_size_in_bytes))
'''


def _temp_bytes(remat: bool, embed: bool, memory_aware: bool) -> int:
  out = subprocess.run([sys.executable, '-c', CASE, str(int(remat)), str(int(embed))],
                       env=common.cpu_env(memory_aware_cpu_scheduler=memory_aware),
                       capture_output=True, text=True, check=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def main(argv=None):
  common.setup_devices(8)
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--json', metavar='PATH')
  a = ap.parse_args(argv)
  meta = common.provenance([], source=None)
  rows = []
  for memory_aware in (False, True):
    for embed in (False, True):
      none, remat = (_temp_bytes(r, embed, memory_aware) for r in (False, True))
      rows.append(dict(scheduler='memory-aware' if memory_aware else 'default',
                       input='embedding lookup' if embed else 'argument, no gradient',
                       temp_bytes_no_remat=none, temp_bytes_remat=remat,
                       ratio=none / remat))
  print(common.header('Per-layer remat on XLA:CPU: compiled temporaries of a gradient', meta)
        + common.table(['scheduler', 'first layer input', 'no remat (MiB)', 'remat (MiB)',
                        'no remat / remat'],
                       [[r['scheduler'], r['input'], r['temp_bytes_no_remat'] // 2**20,
                         r['temp_bytes_remat'] // 2**20, f"{r['ratio']:.2f}"] for r in rows]))
  if a.json:
    common.write_json(a.json, meta, rows=rows)


if __name__ == '__main__':
  main()
