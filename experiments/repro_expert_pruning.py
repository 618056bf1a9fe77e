"""Expert pruning after training (REAP, Lu et al. 2024, MC-SMoE): validation loss of a
trained switch (top-1) and top-2 MoE vs the share of experts removed, with three expert
scores (routing frequency, REAP, reconstruction), against the dense model of the same
active FLOPs.

  python experiments/repro_expert_pruning.py --preset=quick   # ~20 min on 2 CPU cores

Three models trained per seed (dense, switch, top-2; 8 experts in every other block, each
expert as wide as the dense FFN, so switch matches the dense model's FLOPs per token; top-2
runs two experts per token, twice the FFN FLOPs in its MoE blocks, so its FLOP match is
looser). Top-2 uses our capacity_factor 0.625 (cf 1.25 in the paper's convention, which
does not count K; as in repro_switch_table1.py). Each trained MoE is then compressed with
sparse_jax.compress --method=experts: keep 6 / 4 / 2 of 8 experts in every MoE block (25 /
50 / 75% removed) by frequency (share of calibration routing choices), REAP (mean gate
weight x expert output norm over an expert's choices) or reconstruction (how far the
block's output moves when the expert alone is removed), on 4 calibration batches of the
training split, the removed experts dropped; plus frequency with each removed expert
merged into its most similar kept one, at keep 4. No fine-tune afterwards. 3 seeds.
"""
from __future__ import annotations

import shutil

import jax
import numpy as np
from absl import logging
from flax import nnx
from tqdm import tqdm

from sparse_jax import compress

import common
from common import fmt

SEEDS = (0, 1, 2)
EXPERTS = 8
KEEPS = (6, 4, 2)
SCORES = ('frequency', 'reap', 'reconstruction')
MERGE_KEEP = 4
CALIBRATION_BATCHES = 4
# Published [V-abstract / V-2nd]; quoted in the preamble, not comparable numbers.
PAPER = {
    'REAP (2025) [V-abstract]': 'score = router weight x expert output norm; near-lossless at '
                                '50% expert pruning on large coder MoEs; pruning beats '
                                'merging for generation',
    'Lu et al. 2024 [V-2nd]': 'Mixtral 8x7B, 2 of 8 experts removed per layer: ~24% fewer '
                              'parameters, -2.9 points average; 4 of 8: -7.1 points',
    'MC-SMoE (ICLR 2024) [V-abstract]': 'merging experts grouped by router-logit '
                                        'similarity: up to 80% memory reduction with '
                                        'negligible loss',
}


def variants(base) -> dict:
  return {'dense': base, 'switch': common.moe(base, EXPERTS, k=1),
          'top-2': common.moe(base, EXPERTS, k=2, capacity_factor=1.25 / 2)}


def param_count(result) -> int:
  """Parameters of a trained model, embeddings included (as compress counts them)."""
  _, model, _ = common.load(result)
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def points():
  """(score label, score, keep, merge) of every compression of one model."""
  out = [(s, s, keep, False) for keep in KEEPS for s in SCORES]
  return out + [('frequency + merge', 'frequency', MERGE_KEEP, True)]


def main(argv=None):
  common.setup_devices(8)
  a = common.study_args(__doc__, argv)
  base = common.sized(a.preset)
  seeds = SEEDS[:1] if a.preset == 'smoke' else SEEDS
  cfgs = variants(base)
  meta = common.provenance(seeds)
  res = common.run_seeds('expert_pruning', a, cfgs, seeds)
  root = a.runs / f'expert_pruning_{a.preset}' / 'compressed'
  logging.set_verbosity(logging.ERROR)       # orbax's read-only warnings, three per load
  jobs = [(m, p, i) for m in ('switch', 'top-2') for p in points() for i in range(len(seeds))]
  out = {}                                   # (model, score label, keep) -> [record per seed]
  for m, (label, score, keep, merge), i in tqdm(jobs, desc='compress', dynamic_ncols=True):
    dst = root / f"{m}_{label.replace(' + ', '_')}_keep{keep}_seed{seeds[i]}"
    shutil.rmtree(dst, ignore_errors=True)   # compression takes seconds: always recompute
    r = compress.compress(compress.Options(
        workdir=str(res[m][i]['workdir']), out=str(dst), method='experts', keep=keep,
        score=score, merge=merge, calibration_batches=CALIBRATION_BATCHES))
    out.setdefault((m, label, keep), []).append(r)

  rows = []

  def add(model, score, keep, losses, params, kept=None):
    trained = [x['val_loss'] for x in res[model]]
    loss, inc = common.mean_std(losses), common.mean_std(np.subtract(losses, trained))
    rows.append(dict(model=model, score=score, experts_kept=keep,
                     removed=1 - keep / EXPERTS if keep else 0.0, total_params=params,
                     val_loss=loss[0], val_loss_std=loss[1], seeds=list(losses),
                     increase=inc[0], increase_std=inc[1],
                     **({'kept_seed0': kept} if kept else {})))

  add('dense', '–', None, [x['val_loss'] for x in res['dense']], param_count(res['dense'][0]))
  for m in ('switch', 'top-2'):
    first = out[(m, SCORES[0], KEEPS[0])][0]
    add(m, '–', EXPERTS, [x['val_loss'] for x in res[m]], first['before']['params'][0])
    for label, _, keep, _ in points():
      recs = out[(m, label, keep)]
      add(m, label, keep, [r['after']['val_loss'] for r in recs],
          recs[0]['after']['params'][0], kept=recs[0]['kept'])
  by = {(r['model'], r['score'], r['experts_kept']): r for r in rows}
  loss = lambda m, s, k: by[(m, s, k)]['val_loss']
  dense = by[('dense', '–', None)]

  n = len(seeds)
  body = (common.describe(base) + f'; {EXPERTS} experts in every other block (each as wide '
          "as the dense FFN: switch has the dense model's active FLOPs per token, top-2 "
          'twice its FFN FLOPs in the MoE blocks, a looser match); top-2 at cf 1.25 in the '
          f"paper's convention; {n} seed{'s' * (n > 1)} (mean ± std). Pruned with "
          f'sparse_jax.compress on {CALIBRATION_BATCHES} calibration batches of the training '
          'split, no fine-tune; validation loss in nats per byte '
          f'({base.train.eval_batches} validation batches). Removed 0% = the trained model '
          'itself; total params include embeddings; increase = pruned minus unpruned loss, '
          'per seed.\n\nPublished, on far larger models (for the trends, not the numbers):\n\n'
          + ''.join(f'- {k}: {v}.\n' for k, v in PAPER.items()) + '\n')
  body += common.table(
      ['model', 'score', 'experts kept', 'removed', 'total params', 'val loss',
       'increase over unpruned'],
      [[r['model'], r['score'], r['experts_kept'] or '–',
        f"{r['removed']:.0%}" if r['experts_kept'] else '–', f"{r['total_params']:,}",
        fmt(r['val_loss'], r['val_loss_std']),
        f"{r['increase']:+.4f}" + (f" ± {r['increase_std']:.4f}" if r['increase_std'] else '')
        if r['experts_kept'] != EXPERTS and r['model'] != 'dense' else '–'] for r in rows])
  body += ('\n## Kept experts, seed 0\n\nExpert indices kept in each MoE block by each score '
           '(overlap = experts all three keep).\n\n')
  kept_rows = []
  for m in ('switch', 'top-2'):
    for keep in KEEPS:
      kept = [by[(m, s, keep)]['kept_seed0'] for s in SCORES]
      for block in kept[0]:
        shared = set.intersection(*(set(k[block]) for k in kept))
        kept_rows.append([m, block, keep, *(k[block] for k in kept),
                          f'{len(shared)} of {keep}'])
  body += common.table(['model', 'block', 'experts kept', *SCORES, 'overlap'], kept_rows)

  curve = lambda m, s: [by[(m, '–', EXPERTS)]['val_loss']] + [loss(m, s, k) for k in KEEPS]
  verdicts = [(
      'Loss rises as more experts are removed (both models, both scores; keep 8 -> 6 -> 4 -> 2)',
      all(all(x < y for x, y in zip(c, c[1:]))
          for c in (curve(m, s) for m in ('switch', 'top-2') for s in SCORES)),
      '; '.join(f"{m} {s} " + ' -> '.join(f'{x:.4f}' for x in curve(m, s))
                for m in ('switch', 'top-2') for s in SCORES))]
  for s in SCORES[1:]:
    for m in ('switch', 'top-2'):
      verdicts.append((
          f'{m}: {s} <= frequency in loss at every keep',
          all(loss(m, s, k) <= loss(m, 'frequency', k) for k in KEEPS),
          ', '.join(f"keep {k}: {s} {loss(m, s, k):.4f} vs frequency "
                    f"{loss(m, 'frequency', k):.4f}" for k in KEEPS)))
  for m in ('switch', 'top-2'):
    gap = dense['val_loss'] - by[(m, '–', EXPERTS)]['val_loss']
    verdicts.append((
        f'{m}: removing 25% of the experts costs less than the MoE\'s gain over dense (the '
        'pruned MoE still beats dense; both scores)',
        all(loss(m, s, KEEPS[0]) < dense['val_loss'] for s in SCORES),
        f"MoE's gain over dense (dense - MoE loss) {gap:+.4f}; increase at keep "
        f'{KEEPS[0]}: ' + ', '.join(
            f"{s} {by[(m, s, KEEPS[0])]['increase']:+.4f} (loss {loss(m, s, KEEPS[0]):.4f})"
            for s in SCORES) + f"; dense {dense['val_loss']:.4f}"))
  verdicts.append((
      f'Merging the removed experts is no worse than dropping them at keep {MERGE_KEEP} '
      '(frequency scores; MC-SMoE merges, REAP argues pruning wins)',
      all(loss(m, 'frequency + merge', MERGE_KEEP) <= loss(m, 'frequency', MERGE_KEEP)
          for m in ('switch', 'top-2')),
      ', '.join(f"{m}: merge {loss(m, 'frequency + merge', MERGE_KEEP):.4f} vs drop "
                f"{loss(m, 'frequency', MERGE_KEEP):.4f}" for m in ('switch', 'top-2'))))
  common.report('expert_pruning', a,
                'Expert pruning: frequency vs REAP vs reconstruction, dropping vs merging',
                meta, rows, body, verdicts)


if __name__ == '__main__':
  main()
