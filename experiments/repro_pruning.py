"""Magnitude pruning with the gradual (GMP, cubic) schedule of Zhu & Gupta (2017).

  python experiments/repro_pruning.py --preset=quick      # ~6 min on 2 CPU cores

Part 1: one dense model pruned to 0 / 50 / 75 / 90% of every FFN and attention kernel
(layer-wise magnitude, cubic schedule over the first 3/4 of training).
Part 2, large-sparse vs small-dense at equal non-zeros: FFNs 2x / 4x / 8x wider, pruned to
50 / 75 / 87.5% in the FFN, so every model keeps the small dense model's non-zero FFN
weights.
Published: ResNet-50 top-1 76.7 / 76.53 / 75.58 (80%) / 73.91 (90%) (Gale et al. 2019 [V]);
T5 on C4 at equal non-zeros, loss 3.033 (dense) -> 2.738 (50%) -> 2.668 (75%) -> 2.627
(87.5%) (jaxpruner's scaling data [V]).
"""
from __future__ import annotations

from sparse_jax.analysis.accounting import params_from_config

import common
from common import fmt

PART1 = {0.0: None, 0.5: '76.53', 0.75: '75.58 (at 80%)', 0.9: '73.91'}
PART2 = {1: (0.0, '3.033'), 2: (0.5, '2.738'), 4: (0.75, '2.668'), 8: (0.875, '2.627')}


def pruned(base, sparsity, width=1, targets='all'):
  c = common.override(base, model=dict(d_ff=base.model.d_ff * width))
  return common.gmp(c, sparsity, targets=targets) if sparsity else c


def main(argv=None):
  common.setup_devices(8)
  a = common.study_args(__doc__, argv)
  base = common.sized(a.preset)
  cfgs = {f'dense {s:.0%}': pruned(base, s) for s in PART1}
  cfgs.update({f'{w}x FFN at {s:.1%}': pruned(base, s, w, 'ffn')
               for w, (s, _) in PART2.items() if w > 1})
  meta = common.provenance([base.seed])
  res = common.run_study('repro', a.preset, cfgs, a.runs)
  rows = []
  for name, r in res.items():
    c = cfgs[name]
    counts = params_from_config(r['spec'].model)
    emb, total = counts['embedding'], counts['total']
    rows.append(dict(model=name, sparsity=c.pruning.sparsity, d_ff=c.model.d_ff,
                     total_params=total,
                     nonzero_params=round(r['nonzero_params'] - emb)
                     if 'nonzero_params' in r else total,
                     val_loss=r['val_loss'], bpb=r['bpb']))
  part1, part2 = rows[:len(PART1)], [rows[0]] + rows[len(PART1):]
  body = (common.describe(base) + "; non-zero params "
          'counted from the trained weights (embeddings excluded).\n\n'
          '## Part 1: one model, rising sparsity (all FFN and attention kernels)\n\n')
  body += common.table(
      ['sparsity', 'non-zero params', 'val loss', 'loss increase', 'ResNet-50 top-1 (Gale [V])'],
      [[f"{r['sparsity']:.0%}", f"{r['nonzero_params']:,}", fmt(r['val_loss']),
        fmt(r['val_loss'] - part1[0]['val_loss']), p or '76.7 (dense)']
       for r, p in zip(part1, PART1.values())])
  body += '\n## Part 2: large-sparse vs small-dense at equal non-zero FFN weights\n\n'
  body += common.table(
      ['model', 'total params', 'non-zero params', 'val loss', 'T5 loss (jaxpruner [V])'],
      [[r['model'], f"{r['total_params']:,}", f"{r['nonzero_params']:,}", fmt(r['val_loss']),
        p] for r, (_, p) in zip(part2, PART2.values())])
  loss1 = [r['val_loss'] for r in part1]
  loss2 = [r['val_loss'] for r in part2]
  verdicts = [
      ('Loss grows with sparsity, slowly up to 50% and faster beyond',
       all(x < y for x, y in zip(loss1, loss1[1:])) and
       loss1[1] - loss1[0] < loss1[3] - loss1[2],
       ', '.join(f"{r['sparsity']:.0%} {r['val_loss']:.4f}" for r in part1)),
      ('At equal non-zeros, larger-and-sparser beats smaller-and-dense',
       all(x > y for x, y in zip(loss2, loss2[1:])),
       ', '.join(f"{r['model']} {r['val_loss']:.4f}" for r in part2))]
  common.report('pruning', a, 'GMP magnitude pruning', meta, rows, body, verdicts)


if __name__ == '__main__':
  main()
