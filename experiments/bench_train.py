"""Training throughput of the switch LM vs the dense LM with the same active FLOPs per
token, measured side by side in one run on the 8-device CPU mesh: capacity dispatch, and
dropless dispatch on one device's experts and over the expert axis by two transports.

  python experiments/bench_train.py            # configs/dense.py vs configs/switch.py sizes
  python experiments/bench_train.py --quick    # configs/tiny.py sizes
  python experiments/bench_train.py --json out.json

Batches are random tokens already on the mesh, so the numbers are the model's step time
(forward, backward, AdamW update), not the input pipeline's.
"""
from __future__ import annotations

import argparse

import jax

from sparse_jax.analysis.accounting import flops_from_config, params_from_config
from sparse_jax.config import load_config, resolve

import common
import timing

CONFIGS = common.ROOT / 'configs'


def lm_specs(quick: bool) -> dict:
  """{row name: resolved Spec}: configs/dense.py, and configs/switch.py with capacity and
  dropless dispatch on the meshes of each row (configs/tiny.py sizes if quick)."""
  dropless = lambda transport: dict(dispatch='dropless', ep_transport=transport)
  variants = {'dense': ('dense.py', 8, 1, {}), 'switch (expert axis 1)': ('switch.py', 8, 1, {}),
              'switch (expert axis 8)': ('switch.py', 1, 8, {}),
              'switch dropless (expert axis 1)': ('switch.py', 8, 1, dropless('all_to_all')),
              **{f'switch dropless {t} (expert axis 8)': ('switch.py', 1, 8, dropless(t))
                 for t in ('all_to_all', 'sized')}}
  specs = {}
  for name, (file, data, expert, moe) in variants.items():
    c = load_config(CONFIGS / file)
    c.moe.update(moe)
    if quick:
      tiny = load_config(CONFIGS / 'tiny.py')
      c.model, c.train = tiny.model, tiny.train
      c.moe.num_experts = 8 if c.moe.num_experts else 0
      c.train.batch_size = 16
    c.mesh.data, c.mesh.expert = data, expert
    specs[name] = resolve(c, jax.device_count())
  return specs


def main(argv=None):
  common.setup_devices(8)
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--quick', action='store_true')
  ap.add_argument('--steps', type=int, default=None, help='timed steps per model')
  ap.add_argument('--json', metavar='PATH')
  a = ap.parse_args(argv)
  specs = lm_specs(a.quick)
  n = a.steps or (20 if a.quick else 8)
  # Seeds: the configs' (weights) and step_times' random tokens' (0).
  meta = common.provenance(sorted({0, *(s.seed for s in specs.values())}), source=None)
  sec = timing.step_times(specs, n)
  base = sec['dense']
  rows = []
  for name, s in specs.items():
    counts = params_from_config(s.model)
    flops = flops_from_config(s.model, s.train.seq_len)
    rows.append(dict(model=name, mesh=f"{s.mesh['data']}x{s.mesh['expert']}",
                     total_params=counts['total'], active_params=counts['active'],
                     train_flops_per_token=flops['train'],
                     tokens_per_s_ratio=base / sec[name],
                     step_time_ratio=sec[name] / base))
  s0 = specs['dense']
  print(common.header('LM train-step benchmark', meta) +
        f"d_model={s0.model.d_model} layers={s0.model.num_layers} "
        f"batch={s0.train.batch_size}x{s0.train.seq_len}; median of {n} steps\n")
  print('| model | mesh (data x expert) | total params | active params / token | '
        'train FLOPs / token | step time / dense | tokens/s / dense |')
  print('|---|---|---|---|---|---|---|')
  for r in rows:
    print(f"| {r['model']} | {r['mesh']} | {r['total_params']:,} | {r['active_params']:,} | "
          f"{r['train_flops_per_token']:.3g} | {r['step_time_ratio']:.3f} | "
          f"{r['tokens_per_s_ratio']:.3f} |")
  if a.json:
    common.write_json(a.json, meta, steps=n, rows=rows)


if __name__ == '__main__':
  main()
