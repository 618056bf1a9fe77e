"""Condensed constant fan-in layer vs the masked dense matmul: CPU time side by side in one run.

SRigL (Lasby et al., ICLR 2024) stores a constant fan-in sparse linear layer condensed
(values and input indices [K, out]) and reports a 90%-sparse one 3.4x faster than dense on
CPU for online inference (batch 1) and 2.5x batched. This times
sparse_jax.pruning.condensed.condensed_matmul against x @ (w * mask) with the mask already
applied (a dense matmul of the same shape: what the masked layer costs) at 80/90/95%
sparsity, float32, jitted, and checks in the same run that the two outputs agree.

  python experiments/bench_condensed.py --json experiments/results/bench_condensed.json  # ~30 s
  python experiments/bench_condensed.py --quick   # tiny sizes, seconds (for the tests)

Layers 2048x2048 and 4096x1024 (in x out), 1 row (online inference) and 256 rows; masks
from constant_fan_in_mask (the largest |w| per output). Each call is timed on its own,
dispatch included (an online server pays it too); all variants of a layer and row count
run round-robin so drift hits them alike, after a warm-up call each; medians.
The process has 8 simulated CPU devices like the other benches; the arrays and the
computation are on the first. The simulated devices share XLA:CPU's one thread pool, so a
one-device computation gets every core either way (no difference measured between 1 and
8 devices).
"""
from __future__ import annotations

import argparse
import pathlib
import statistics
import time

import jax
import numpy as np

from sparse_jax.pruning.condensed import condense, condensed_matmul, constant_fan_in_mask

import common

SEEDS = (0, 1)               # numpy generators of the weights (0) and the inputs (1)
SPARSITIES = (0.8, 0.9, 0.95)
TOL = 1e-6                   # max |condensed - dense| / max |dense| for 'equal'


def cpu_model() -> str:
  """The CPU's model name (Linux), for the table's provenance; '' when unknown."""
  try:
    for line in pathlib.Path('/proc/cpuinfo').read_text().splitlines():
      if line.startswith('model name'):
        return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return ''


def time_side_by_side(fns: dict, rounds: int) -> dict:
  """Median seconds per call of each f(); round-robin so drift hits all alike."""
  for f in fns.values():
    jax.block_until_ready(f())                                  # compile + warm up
  times = {k: [] for k in fns}
  for _ in range(rounds):
    for k, f in fns.items():
      t = time.perf_counter()
      jax.block_until_ready(f())
      times[k].append(time.perf_counter() - t)
  return {k: statistics.median(v) for k, v in times.items()}


def bench_layer(n_in: int, n_out: int, batch: int, rounds: int, device) -> list[dict]:
  """Rows (one per sparsity) for one layer shape and row count."""
  w = np.random.default_rng(SEEDS[0]).standard_normal((n_in, n_out)).astype(np.float32)
  x = np.random.default_rng(SEEDS[1]).standard_normal((batch, n_in)).astype(np.float32)
  x = jax.device_put(x[0] if batch == 1 else x, device)          # batch 1: x is [in]
  dense, cond = jax.jit(lambda x, w: x @ w), jax.jit(condensed_matmul)
  fns, info = {}, {}
  for s in SPARSITIES:
    mask = np.asarray(constant_fan_in_mask(w, s))
    masked = jax.device_put(w * mask, device)
    values, indices = jax.device_put(condense(w, mask), device)
    fns[('dense', s)] = lambda m=masked: dense(x, m)
    fns[('condensed', s)] = lambda v=values, i=indices: cond(x, v, i)
    y_dense, y_cond = np.asarray(fns[('dense', s)]()), np.asarray(fns[('condensed', s)]())
    y64 = np.asarray(x, np.float64) @ (w * mask).astype(np.float64)     # exact to ~1e-16
    scale = float(np.max(np.abs(y_dense)))
    diff = float(np.max(np.abs(y_cond - y_dense)))
    info[s] = dict(k=values.shape[0], max_abs_diff=diff, max_rel_diff=diff / scale,
                   dense_err=float(np.max(np.abs(y_dense - y64))) / scale,
                   condensed_err=float(np.max(np.abs(y_cond - y64))) / scale)
  sec = time_side_by_side(fns, rounds)
  rows = []
  for s in SPARSITIES:
    d, c, k = sec[('dense', s)], sec[('condensed', s)], info[s]['k']
    rows.append(dict(layer=f'{n_in}x{n_out}', n_in=n_in, n_out=n_out, sparsity=s, k=k,
                     batch=batch, dense_ms=d * 1e3, condensed_ms=c * 1e3, speedup=d / c,
                     ideal_speedup=n_in / k,           # multiply-adds dense / condensed
                     **{key: info[s][key] for key in ('max_abs_diff', 'max_rel_diff',
                                                      'dense_err', 'condensed_err')},
                     equal=info[s]['max_rel_diff'] <= TOL))
  return rows


def markdown(rows: list[dict], meta: dict, calls: dict) -> str:
  md = common.header('Condensed constant fan-in layer vs masked dense matmul (CPU)', meta)
  md += (f"CPU: {meta['cpu'] or 'unknown'}. float32, jitted, arrays on one device; median of "
         f"{calls['batch_1']} calls at batch 1 and {calls['batched']} batched, interleaved. Dense = "
         'x @ (w * mask), a dense matmul of the same shape; speed-up = dense time / condensed '
         'time; ideal = in / K (multiply-adds); equal: max |condensed - dense| <= '
         f'{TOL:g} x max |dense|; float32 error: max |y - y_float64| / max |dense| of each '
         '(rounding of the float32 sums: the dense matmul has its own).\n\n')
  md += common.table(
      ['layer (in x out)', 'sparsity', 'K', 'batch', 'dense (ms)', 'condensed (ms)',
       'speed-up', 'ideal', 'max abs diff', 'equal', 'float32 error dense / condensed'],
      [[r['layer'], f"{r['sparsity']:.0%}", r['k'], r['batch'], f"{r['dense_ms']:.3f}",
        f"{r['condensed_ms']:.3f}", f"{r['speedup']:.2f}x", f"{r['ideal_speedup']:.1f}x",
        f"{r['max_abs_diff']:.1e}", 'yes' if r['equal'] else '**no**',
        f"{r['dense_err']:.1e} / {r['condensed_err']:.1e}"] for r in rows])
  md += ('\nSRigL (Lasby et al., ICLR 2024) reports 3.4x (batch 1) and 2.5x (batched) for a '
         '90%-sparse condensed layer on CPU, with its own kernels.\n')
  return md


def main(argv=None):
  common.setup_devices(8)
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--quick', action='store_true', help='a 256x128 layer, 1 and 8 rows')
  ap.add_argument('--repeats', type=int, default=50,
                  help='timed calls per variant at batch > 1 (5x as many at batch 1, '
                       'whose calls are ~1 ms and noisier)')
  ap.add_argument('--json', metavar='PATH',
                  help='write the rows as JSON here and the table next to it (.md)')
  a = ap.parse_args(argv)
  layers = [(256, 128)] if a.quick else [(2048, 2048), (4096, 1024)]
  batches = (1, 8) if a.quick else (1, 256)
  calls = {'batch_1': 5 * a.repeats, 'batched': a.repeats}
  device = jax.devices()[0]
  meta = common.provenance(SEEDS, source=None) | {'cpu': cpu_model()}
  rows = [r for n_in, n_out in layers for b in batches
          for r in bench_layer(n_in, n_out, b, calls['batch_1' if b == 1 else 'batched'],
                               device)]
  md = markdown(rows, meta, calls)
  print(md)
  if a.json:
    common.write_json(a.json, meta, calls=calls, tolerance=TOL, rows=rows)
    pathlib.Path(a.json).with_suffix('.md').write_text(md)


if __name__ == '__main__':
  main()
