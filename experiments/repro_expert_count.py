"""Expert count at fixed FLOPs per token (Switch Transformer, Fedus et al. 2021): top-1
with 1, 2, 4, 8 and 16 experts in every other block; every model costs the same FLOPs
per token (one expert per token), only the parameter count grows.

  python experiments/repro_expert_count.py --preset=quick      # ~5 min on 2 CPU cores

Paper [V]: from 2 to 256 experts the loss keeps improving; 64 experts reach T5-Base's
quality 7.5x sooner in steps. Here: final validation loss and the steps each model needs
to reach the 1-expert model's final loss.
"""
from __future__ import annotations

from sparse_jax.analysis.accounting import flops_from_config, params_from_config

import common
from common import fmt, steps_to

EXPERTS = (1, 2, 4, 8, 16)


def main(argv=None):
  common.setup_devices(8)
  a = common.study_args(__doc__, argv)
  base = common.sized(a.preset)
  cfgs = {f'E={e}': common.moe(base, e, k=1) for e in EXPERTS}
  meta = common.provenance([base.seed])
  res = common.run_study('repro', a.preset, cfgs, a.runs)
  target = res['E=1']['val_loss']
  rows = []
  for name, r in res.items():
    m = r['spec'].model
    rows.append(dict(model=name, experts=m.moe.num_experts,
                     total_params=params_from_config(m)['total'],
                     train_flops=flops_from_config(m, r['spec'].train.seq_len)['train'],
                     val_loss=r['val_loss'],
                     steps_to_e1=steps_to(r['curve'], target),
                     dropped_fraction=r.get('dropped_fraction', 0.0)))
  body = common.describe(base) + ", top-1, cf 1.25, MoE in every other block.\n\n"
  body += common.table(
      ['experts', 'total params', 'train FLOPs / token', 'val loss', "steps to E=1's loss",
       'dropped'],
      [[r['experts'], f"{r['total_params']:,}", f"{r['train_flops']:.3g}", fmt(r['val_loss']),
        f"{r['steps_to_e1']:.0f}" if r['steps_to_e1'] is not None else 'not reached',
        fmt(r['dropped_fraction'], digits=3)] for r in rows])
  losses = [r['val_loss'] for r in rows]
  verdicts = [
      ('Loss falls with every doubling of experts (paper: 2 -> 256 keeps improving)',
       all(x > y for x, y in zip(losses, losses[1:])),
       ', '.join(f"E={r['experts']} {r['val_loss']:.4f}" for r in rows)),
      ('More experts reach the 1-expert loss sooner (paper: 64 experts 7.5x sooner)',
       rows[-1]['steps_to_e1'] is not None and rows[-1]['steps_to_e1'] < rows[0]['steps_to_e1'],
       f"E=16 at step {fmt(rows[-1]['steps_to_e1'], digits=0)} vs E=1 at "
       f"{fmt(rows[0]['steps_to_e1'], digits=0)}")]
  common.report('expert_count', a, 'Expert count at fixed FLOPs per token', meta, rows, body,
                verdicts)


if __name__ == '__main__':
  main()
