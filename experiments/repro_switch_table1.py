"""Switch Transformer Table 1 (Fedus et al. 2021): top-1 vs top-2 at capacity factors
1.0, 1.25 and 2.0, against a dense model of the same FLOPs per token; and a dropless
column the paper does not have (no capacity: nothing dropped, no padding computed).

  python experiments/repro_switch_table1.py --preset=quick      # ~7 min on 2 CPU cores

Capacity follows the paper: tokens per group / experts x cf, with no K; so the top-2 runs
use our moe.capacity_factor = cf / 2 (ours counts K). 8 experts in every other block
(theirs: 128). Quality = -validation loss (nats per byte; theirs: negative log
perplexity on C4 span corruption). Step time is measured side by side.
"""
from __future__ import annotations

import common
import timing
from common import fmt

CFS = (1.0, 1.25, 2.0)
# Table 1 [V]: (quality @100k steps, examples/s); T5-Base is the FLOP-matched dense model.
PAPER = {'dense': (-1.731, 1600), 'top-2 cf 2.0': (-1.547, 840),
         'top-2 cf 1.25': (-1.559, 790), 'top-2 cf 1.0': (-1.572, 860),
         'switch cf 2.0': (-1.554, 860), 'switch cf 1.25': (-1.553, 910),
         'switch cf 1.0': (-1.561, 1000)}


def configs(base) -> dict:
  out = {'dense': base}
  for k, name in ((2, 'top-2'), (1, 'switch')):
    for cf in sorted(CFS, reverse=True):
      out[f'{name} cf {cf}'] = common.moe(base, 8, k=k, capacity_factor=cf / k)
    out[f'{name} dropless'] = common.moe(base, 8, k=k, dispatch='dropless')
  return out


def main(argv=None):
  common.setup_devices(8)
  a = common.study_args(__doc__, argv)
  base = common.sized(a.preset)
  cfgs = configs(base)
  meta = common.provenance([base.seed])
  res = common.run_study('repro', a.preset, cfgs, a.runs)
  sec = timing.step_times({name: r['spec'] for name, r in res.items()},
                          n=timing.timed_steps(a.preset))
  rows = []
  for name, r in res.items():
    rows.append(dict(model=name, quality=-r['val_loss'], val_loss=r['val_loss'],
                     dropped_fraction=r.get('dropped_fraction', 0.0),
                     step_time_ratio=sec[name] / sec['dense'],
                     paper_quality=PAPER[name][0] if name in PAPER else None,
                     paper_speed_ratio=(PAPER['dense'][1] / PAPER[name][1]
                                        if name in PAPER else None)))
  by = {r['model']: r for r in rows}
  body = (common.describe(base) + ", 8 experts; paper: "
          'T5-Base, 128 experts, 100k steps (Table 1 [V]). Paper step time = examples/s of '
          'T5-Base / examples/s of the model.\n\n')
  body += common.table(
      ['model', 'quality (−val loss)', 'dropped', 'step time / dense', 'paper quality',
       'paper step time / dense'],
      [[r['model'], fmt(r['quality']), fmt(r['dropped_fraction'], digits=3),
        f"{r['step_time_ratio']:.2f}x", fmt(r['paper_quality'], digits=3),
        f"{r['paper_speed_ratio']:.2f}x" if r['paper_speed_ratio'] else '–'] for r in rows])
  sw = [by[f'switch cf {cf}'] for cf in CFS]
  t2 = [by[f'top-2 cf {cf}'] for cf in CFS]
  best = max(sw + t2, key=lambda r: r['quality'])
  verdicts = [
      ('Every MoE variant beats the FLOP-matched dense model',
       all(r['quality'] > by['dense']['quality'] for r in sw + t2),
       f"dense {fmt(by['dense']['quality'])}, worst MoE "
       f"{fmt(min(r['quality'] for r in sw + t2))}"),
      ('Quality rises with the capacity factor (paper: top-2 -1.572 at cf 1.0 -> '
       '-1.547 at 2.0; switch -1.561 -> -1.554)',
       all(fam[2]['quality'] > fam[0]['quality'] for fam in (sw, t2)),
       f"top-2 {fmt(t2[0]['quality'])} -> {fmt(t2[2]['quality'])}, switch "
       f"{fmt(sw[0]['quality'])} -> {fmt(sw[2]['quality'])}"),
      ('A larger capacity factor drops fewer tokens',
       all(x['dropped_fraction'] >= y['dropped_fraction']
           for fam in (sw, t2) for x, y in zip(fam, fam[1:])),
       'dropped ' + ', '.join(f"{r['model']} {r['dropped_fraction']:.3f}" for r in sw + t2)),
      ('A larger capacity factor costs step time',
       sw[2]['step_time_ratio'] > sw[0]['step_time_ratio'] and
       t2[2]['step_time_ratio'] > t2[0]['step_time_ratio'],
       f"switch cf 1.0 {sw[0]['step_time_ratio']:.2f}x -> cf 2.0 "
       f"{sw[2]['step_time_ratio']:.2f}x; top-2 {t2[0]['step_time_ratio']:.2f}x -> "
       f"{t2[2]['step_time_ratio']:.2f}x"),
      ('Top-2 is slower per step than switch at the same cf',
       all(x['step_time_ratio'] > y['step_time_ratio'] for x, y in zip(t2, sw)),
       ', '.join(f"cf {cf}: {x['step_time_ratio']:.2f}x vs {y['step_time_ratio']:.2f}x"
                 for cf, x, y in zip(CFS, t2, sw))),
      ('Dropless drops nothing',
       all(by[f'{n} dropless']['dropped_fraction'] == 0 for n in ('switch', 'top-2')),
       ', '.join(f"{n} dropless {by[f'{n} dropless']['dropped_fraction']:.3f}"
                 for n in ('switch', 'top-2'))),
      ('Dropless is at least as good as the best capacity factor',
       all(by[f'{n} dropless']['quality'] >= max(r['quality'] for r in fam)
           for n, fam in (('switch', sw), ('top-2', t2))),
       ', '.join(f"{n}: dropless {fmt(by[f'{n} dropless']['quality'])} vs best cf "
                 f"{fmt(max(r['quality'] for r in fam))}"
                 for n, fam in (('switch', sw), ('top-2', t2))))]
  common.report('switch_table1', a, 'Switch Transformer Table 1 at small scale',
                meta | {'step_seconds': sec}, rows, body, verdicts,
                footer=f"\nBest quality here: {best['model']} ({fmt(best['quality'])}).\n")


if __name__ == '__main__':
  main()
