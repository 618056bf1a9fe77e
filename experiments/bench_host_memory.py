"""LM step time with freed host memory kept (cli.keep_freed_memory, what the commands and
experiments do) vs glibc malloc's defaults, on the 8-device CPU mesh.

The setting holds for a whole process, so each runs in child processes, in turn (kept,
defaults, kept, defaults, ...): each child times the dense LM and the switch LM (capacity,
and dropless 'all_to_all', expert axis 8) of bench_train.py side by side and counts the
page faults of its timed steps. Reported: per model, the median over rounds of step time
kept / step time with the defaults; per setting, the page faults per step (all models).

  python experiments/bench_host_memory.py --json experiments/results/bench_host_memory.json
  python experiments/bench_host_memory.py --quick     # configs/tiny.py sizes, 1 round
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys

import common

MODELS = ('dense', 'switch (expert axis 8)', 'switch dropless all_to_all (expert axis 8)')
SETTINGS = {'kept': '1', 'defaults': '0'}           # SPARSE_JAX_KEEP_FREED_MEMORY


def child(quick: bool, steps: int) -> dict:
  """{'seconds': {model: median seconds per step}, 'faults': page faults per step}."""
  common.setup_devices(8)
  import bench_train
  import timing
  specs = {m: s for m, s in bench_train.lm_specs(quick).items() if m in MODELS}
  runs = {m: timing.compiled_step(s) for m, s in specs.items()}
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  sec = timing.interleaved_times(runs, steps)
  per_step = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / (
      (steps + 2) * len(runs))                              # interleaved_times' warm-ups too
  return {'seconds': sec, 'faults': per_step}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--quick', action='store_true')
  ap.add_argument('--rounds', type=int, default=None, help='child processes per setting')
  ap.add_argument('--steps', type=int, default=8, help='timed steps per model and child')
  ap.add_argument('--json', metavar='PATH')
  ap.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
  a = ap.parse_args(argv)
  if a.child:
    print(json.dumps(child(a.quick, a.steps)))
    return
  rounds = a.rounds or (1 if a.quick else 2)
  meta = {**common.provenance([0], source=None), 'devices': '8 x cpu (each child)'}
  got = {s: [] for s in SETTINGS}
  for _ in range(rounds):
    for setting, flag in SETTINGS.items():
      out = subprocess.run(
          [sys.executable, __file__, '--child', '--steps', str(a.steps)] +
          (['--quick'] if a.quick else []), check=True, capture_output=True, text=True,
          env=dict(os.environ, SPARSE_JAX_KEEP_FREED_MEMORY=flag))
      got[setting].append(json.loads(out.stdout.splitlines()[-1]))
  rows = []
  for m in MODELS:
    ratios = [k['seconds'][m] / d['seconds'][m] for k, d in zip(got['kept'], got['defaults'])]
    rows.append(dict(model=m, step_time_kept_over_defaults=statistics.median(ratios),
                     per_round=ratios))
  faults = {s: statistics.median(r['faults'] for r in got[s]) for s in SETTINGS}
  print(common.header('Host memory kept vs glibc defaults: LM train step', meta) +
        f'{rounds} round(s) of one child per setting; median of {a.steps} steps per child\n')
  print(common.table(['model', 'step time kept / defaults'],
                     [[r['model'], f"{r['step_time_kept_over_defaults']:.3f}"] for r in rows]))
  print('page faults per step: ' + ', '.join(f'{s} {v:,.0f}' for s, v in faults.items()))
  if a.json:
    common.write_json(a.json, meta, rounds=rounds, steps=a.steps, rows=rows,
                      page_faults_per_step=faults)
  return rows, faults


if __name__ == '__main__':
  main()
