"""What FSDP, remat and bfloat16 compute buy: memory per device and step time of the
train step, {replicated, FSDP} x {remat none, block} x {float32, bfloat16}, on the
8-device CPU mesh (data axis 8).

  python experiments/bench_memory.py                 # configs/switch.py and a 1.5x wider one
  python experiments/bench_memory.py --quick         # configs/tiny.py sizes (for the tests)
  python experiments/bench_memory.py --out experiments/results

state_bytes_per_device: parameters + optimizer state on the most loaded device, from the
arrays' shardings. compiled_temp_bytes: XLA's memory analysis of the compiled step.
Step time is a ratio to the replicated float32 run of the same model, measured
interleaved in this run (batches are random tokens already on the mesh). The global
batch is 64 sequences (8 per device), so that activations, what remat saves, are a
visible part of the temporaries.

XLA:CPU (jax 0.10.2) schedules for concurrency by default, and then remat saves almost
nothing (experiments/bench_remat_cpu.py). This script uses its memory-aware scheduler
(--xla_cpu_enable_concurrency_optimized_scheduler=false, common.setup_devices) so the
table shows what remat buys where XLA:CPU lets it.
"""
from __future__ import annotations

import argparse
import itertools
import pathlib

import jax

from sparse_jax.config import load_config, resolve

import common
import timing

CONFIGS = common.ROOT / 'configs'
VARIANTS = list(itertools.product((False, True), ('none', 'block'), ('float32', 'bfloat16')))


def _configs(quick: bool) -> dict:
  switch = load_config(CONFIGS / 'switch.py')
  if quick:
    tiny = load_config(CONFIGS / 'tiny.py')
    switch.model, switch.train = tiny.model, tiny.train
    switch.train.batch_size = 16
    return {'tiny': switch}
  switch.train.batch_size = 64
  wide = common.override(switch, model=dict(d_model=384, d_ff=1536, num_heads=6))
  return {'switch': switch, 'switch, 1.5x wider': wide}


def main(argv=None):
  common.setup_devices(8, memory_aware_cpu_scheduler=True)
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--quick', action='store_true')
  ap.add_argument('--steps', type=int, default=None, help='timed steps per variant')
  ap.add_argument('--out', type=pathlib.Path, default=None,
                  help='write bench_memory.{md,csv,json} here')
  a = ap.parse_args(argv)
  n = a.steps or (3 if a.quick else 5)
  models = _configs(a.quick)
  specs = {}
  for model, base in models.items():
    for fsdp, remat, dtype in VARIANTS:
      c = common.override(base, mesh=dict(data=8, expert=1, fsdp=fsdp),
                          train=dict(remat=remat), model=dict(dtype=dtype))
      specs[(model, fsdp, remat, dtype)] = resolve(c, jax.device_count())
  meta = common.provenance(sorted({0, *(s.seed for s in specs.values())}), source=None)
  rows = []
  for model in models:
    # One variant at a time next to the baseline (all eight of the wider model's states
    # do not fit in this machine's memory at once).
    base_key = (model, False, 'none', 'float32')
    base = timing.compiled_step(specs[base_key])
    total = base[3]['state_bytes_per_device']    # replicated on a data-only mesh: all of it
    for key, s in specs.items():
      if key[0] != model:
        continue
      run = base if key == base_key else timing.compiled_step(s)
      sec = timing.interleaved_times({'base': base, 'variant': run}, n)
      mem = run[3]
      _, fsdp, remat, dtype = key
      rows.append(dict(model=model, fsdp=fsdp, remat=remat, dtype=dtype,
                       d_model=s.model.d_model, seq_len=s.train.seq_len,
                       batch=s.train.batch_size, total_state_bytes=total, **mem,
                       state_vs_total_over_8=mem['state_bytes_per_device'] / (total / 8),
                       step_time_ratio=sec['variant'] / sec['base']))
      del run
    del base
  md = common.header('Memory per device: FSDP, remat, bfloat16', meta)
  md += (f'Mesh data 8 x expert 1 (8 devices); median of {n} steps; state = parameters + '
         f'optimizer state; XLA flag {common.MEMORY_AWARE_CPU_SCHEDULER}.\n\n')
  md += common.table(
      ['model', 'FSDP', 'remat', 'compute dtype', 'state bytes / device',
       'state / (total/8)', 'compiled temp bytes', 'step time / replicated f32'],
      [[r['model'], r['fsdp'], r['remat'], r['dtype'], f"{r['state_bytes_per_device']:,}",
        f"{r['state_vs_total_over_8']:.3f}", f"{r['compiled_temp_bytes']:,}",
        f"{r['step_time_ratio']:.2f}"] for r in rows])
  print(md)
  if a.out:
    common.write_results('bench_memory', md, rows, meta, a.out)


if __name__ == '__main__':
  main()
