"""Training throughput of the switch LM vs the dense LM with the same active FLOPs per
token, measured side by side in one run on the 8-device CPU mesh.

  python experiments/bench_train.py            # configs/dense.py vs configs/switch.py sizes
  python experiments/bench_train.py --quick    # configs/tiny.py sizes
  python experiments/bench_train.py --json out.json

Batches are random tokens already on the mesh, so the numbers are the model's step time
(forward, backward, AdamW update), not the input pipeline's.
"""
from __future__ import annotations

import common  # noqa: F401  (first: sets up the 8 simulated devices)

import argparse
import json
import os
import pathlib
import platform

import jax

from sparse_jax import models
from sparse_jax.config import load_config, validate

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / 'configs'


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--quick', action='store_true')
  ap.add_argument('--steps', type=int, default=None, help='timed steps per model')
  ap.add_argument('--json', metavar='PATH')
  a = ap.parse_args()
  variants = {'dense': ('dense.py', 8, 1), 'switch (expert axis 1)': ('switch.py', 8, 1),
              'switch (expert axis 8)': ('switch.py', 1, 8)}
  configs = {}
  for name, (file, data, expert) in variants.items():
    c = load_config(CONFIGS / file)
    if a.quick:
      tiny = load_config(CONFIGS / 'tiny.py')
      c.model, c.train = tiny.model, tiny.train
      c.moe.num_experts = 8 if c.moe.num_experts else 0
      c.train.batch_size = 16
    c.mesh.data, c.mesh.expert = data, expert
    validate(c, jax.device_count())
    configs[name] = c
  n = a.steps or (20 if a.quick else 8)
  sec = common.step_times(configs, n)
  base = sec['dense']
  machine = (f'{platform.machine()}, {os.cpu_count()} CPU cores, '
             f'{jax.devices()[0].platform} x{jax.device_count()}, jax {jax.__version__}')
  rows = []
  for name, c in configs.items():
    counts, flops = models.count_params(c), models.flops_per_token(c)
    rows.append(dict(model=name, mesh=f"{c.mesh.data}x{c.mesh.expert}",
                     total_params=counts['total'], active_params=counts['active'],
                     train_flops_per_token=flops['train'],
                     tokens_per_s_ratio=base / sec[name],
                     step_time_ratio=sec[name] / base))
  c0 = configs['dense']
  print(f"# LM train-step benchmark: d_model={c0.model.d_model} layers={c0.model.num_layers} "
        f"batch={c0.train.batch_size}x{c0.train.seq_len}; {machine}; median of {n} steps\n")
  print('| model | mesh (data x expert) | total params | active params / token | '
        'train FLOPs / token | step time / dense | tokens/s / dense |')
  print('|---|---|---|---|---|---|---|')
  for r in rows:
    print(f"| {r['model']} | {r['mesh']} | {r['total_params']:,} | {r['active_params']:,} | "
          f"{r['train_flops_per_token']:.3g} | {r['step_time_ratio']:.3f} | "
          f"{r['tokens_per_s_ratio']:.3f} |")
  if a.json:
    pathlib.Path(a.json).write_text(json.dumps(dict(machine=machine, steps=n, rows=rows),
                                               indent=1))


if __name__ == '__main__':
  main()
