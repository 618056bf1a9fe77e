"""One-shot post-training pruning (magnitude, Wanda, SparseGPT) at 50% unstructured and
2:4, before and after a short recovery fine-tune: the Wanda / SparseGPT papers' table shape.

  python experiments/repro_oneshot.py --preset=quick      # ~10 min on 2 CPU cores (3 seeds)

The main job's dense model is trained once per seed, then every FFN and attention kernel
(targets='all'; the tied embedding and the norms stay dense) is pruned in one shot to 50%
per kernel or 2:4 along its inputs, with 4 training batches as calibration data: magnitude
= |W| over the whole kernel; Wanda = |W| * ||X||_2 compared per output, no weight update;
SparseGPT = OBS-style pruning that updates the kept weights (block 128, damp 0.01). Each pruned
model is then fine-tuned for steps/5 more steps (40 at --preset=quick) at the dense run's
final learning rate (min_lr_ratio x lr), on fresh training data, its masks fixed.
Published: OPT-175B / BLOOM-176B pruned to 50-60% unstructured in one shot with negligible
perplexity increase, extending to 2:4 and 4:8 (SparseGPT, Frantar & Alistarh 2023
[V-abstract]); Wanda at 50% unstructured close to SparseGPT and far better than magnitude
on LLaMA (Sun et al. 2024 [S]).
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil

from absl import logging
from tqdm import tqdm

from sparse_jax import compress
from sparse_jax.analysis.accounting import params_from_config
from sparse_jax.config import from_saved

import common
from common import fmt

SEEDS = (0, 1, 2)
CALIBRATION_BATCHES = 4
METHODS = {'magnitude': 'magnitude', 'wanda': 'Wanda', 'sparsegpt': 'SparseGPT'}
# label: (workdir slug, compress options)
PATTERNS = {'50%': ('unstructured50', dict(sparsity=0.5)),
            '2:4': ('2of4', dict(n_m='2:4'))}
# What the papers say about each (method, pattern), at LLM scale; nothing else is cited.
PAPER = {
    ('magnitude', '50%'): 'far worse than Wanda and SparseGPT on LLaMA [S]',
    ('wanda', '50%'): 'close to SparseGPT on LLaMA, no weight update [S]',
    ('sparsegpt', '50%'): 'OPT-175B / BLOOM-176B at 50-60%: negligible perplexity '
                          'increase [V-abstract]',
    ('sparsegpt', '2:4'): 'extends to 2:4 and 4:8 [V-abstract]',
}


def one_shot(src, dst, method, options) -> dict:
  """compress() src into a fresh dst; its record (before, after, step)."""
  shutil.rmtree(dst, ignore_errors=True)
  dst.parent.mkdir(parents=True, exist_ok=True)
  log, verbosity = io.StringIO(), logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)       # orbax's notes on reading src read-only
  try:
    with contextlib.redirect_stdout(log):
      r = compress.compress(compress.Options(
          workdir=str(src), out=str(dst), method=method, targets='all',
          calibration_batches=CALIBRATION_BATCHES, **options))
  finally:
    logging.set_verbosity(verbosity)
  (dst / 'log.txt').write_text(log.getvalue())
  return r


def fine_tune(dst, step, extra, bar) -> dict:
  """Continue the compressed workdir dst for `extra` steps at the source run's final
  learning rate; read_run of the result."""
  c = from_saved(json.loads((dst / 'config.json').read_text()))
  c.train.lr_decay_steps = c.train.lr_decay_steps or step    # schedule ended at `step`
  c.train.steps = step + extra
  c.train.eval_every = extra                                 # evaluates the last step
  return common.continue_run(dst, c, bar)


def main(argv=None):
  common.setup_devices(8)
  a = common.study_args(__doc__, argv)
  base = common.sized(a.preset)
  seeds = SEEDS[:1] if a.preset == 'smoke' else SEEDS
  steps = base.train.steps
  extra = max(1, steps // 5)
  meta = common.provenance(seeds)
  dense = common.run_seeds('oneshot', a, {'dense': base}, seeds)['dense']
  emb = params_from_config(dense[0]['spec'].model)['embedding']
  root = a.runs / f'oneshot_{a.preset}' / 'compressed'

  jobs = [(m, p, i) for p in PATTERNS for m in METHODS for i in range(len(seeds))]
  bar = tqdm(total=(len(jobs) + len(seeds)) * (steps + extra), unit='step',
             dynamic_ncols=True)
  runs, dense_ft = {}, []
  try:
    for i, s in enumerate(seeds):         # the baseline: the dense model trained as long
      bar.set_description(f'dense seed {s}, {extra} more steps')
      dst = root / f'dense_seed{s}'
      shutil.rmtree(dst, ignore_errors=True)
      shutil.copytree(dense[i]['workdir'], dst)
      dense_ft.append(fine_tune(dst, steps, extra, bar)['val_loss'])
    for m, p, i in jobs:
      slug, options = PATTERNS[p]
      bar.set_description(f'{METHODS[m]} {p} seed {seeds[i]}')
      dst = root / f'{m}_{slug}_seed{seeds[i]}'
      r = one_shot(dense[i]['workdir'], dst, m, options)
      assert r['step'] == steps, (r['step'], steps)
      ft = fine_tune(dst, r['step'], extra, bar)
      runs.setdefault((m, p), []).append(dict(
          before=r['before']['val_loss'], after=r['after']['val_loss'],
          fine_tuned=ft['val_loss'], dense_fine_tuned=dense_ft[i],
          params=r['after']['params'][0] - emb,
          nonzero=r['after']['params'][1] - emb,
          nonzero_fine_tuned=ft.get('nonzero_params', float('nan')) - emb))
  finally:
    bar.close()

  dense_loss = common.mean_std([r['val_loss'] for r in dense])
  dense_ft_loss = common.mean_std(dense_ft)
  rows = [dict(method='dense', pattern='', val_loss=dense_loss[0], val_loss_std=dense_loss[1],
               fine_tuned=dense_ft_loss[0], fine_tuned_std=dense_ft_loss[1],
               seeds=[r['val_loss'] for r in dense], seeds_fine_tuned=dense_ft)]
  for (m, p), rs in runs.items():
    col = lambda key: [r[key] for r in rs]
    inc = common.mean_std([r['after'] - r['before'] for r in rs])
    inc_ft = common.mean_std([r['fine_tuned'] - r['dense_fine_tuned'] for r in rs])
    after, ft = common.mean_std(col('after')), common.mean_std(col('fine_tuned'))
    rows.append(dict(method=m, pattern=p, params=rs[0]['params'], nonzero=rs[0]['nonzero'],
                     dense_val_loss=common.mean_std(col('before'))[0],
                     val_loss=after[0], val_loss_std=after[1], increase=inc[0],
                     increase_std=inc[1], fine_tuned=ft[0], fine_tuned_std=ft[1],
                     fine_tuned_increase=inc_ft[0], fine_tuned_increase_std=inc_ft[1],
                     masks_kept=all(r['nonzero_fine_tuned'] == r['nonzero'] for r in rs),
                     seeds=rs))
  by = {(r['method'], r['pattern']): r for r in rows[1:]}

  body = (common.describe(base) + f'; {len(seeds)} seed(s) (mean ± std); one-shot pruning of '
          f'every FFN and attention kernel with {CALIBRATION_BATCHES} training batches of '
          f'calibration data, then {extra} more steps of training at the dense run\'s final '
          'learning rate with the masks fixed. Increases are over the same seed\'s dense '
          f'model: at step {steps} after one-shot pruning, and trained the same {extra} '
          'more steps after the fine-tune; non-zero params counted from the pruned weights, '
          'embeddings excluded.\n\n')
  table = [['dense', '', f"{rows[1]['params']:,}", fmt(*dense_loss), '',
            fmt(*dense_ft_loss), '', '']]
  for (m, p), r in by.items():
    table.append([METHODS[m], p, f"{r['nonzero']:,}", fmt(r['val_loss'], r['val_loss_std']),
                  fmt(r['increase'], r['increase_std']),
                  fmt(r['fine_tuned'], r['fine_tuned_std']),
                  fmt(r['fine_tuned_increase'], r['fine_tuned_increase_std']),
                  PAPER.get((m, p), '')])
  body += common.table(['method', 'pattern', 'non-zero params', 'val loss after one-shot',
                        'increase over dense', f'after recovery fine-tune ({extra} steps)',
                        'increase', 'published (LLM scale)'], table)

  inc = lambda m, p: by[(m, p)]['increase']
  inc_ft = lambda m, p: by[(m, p)]['fine_tuned_increase']
  verdicts = []
  for p in PATTERNS:
    verdicts.append((f'At {p}: SparseGPT ≤ Wanda < magnitude in loss increase',
                     inc('sparsegpt', p) <= inc('wanda', p) < inc('magnitude', p),
                     ', '.join(f'{METHODS[m]} {inc(m, p):+.4f}'
                               for m in ('sparsegpt', 'wanda', 'magnitude'))))
  verdicts.append(('2:4 costs more than 50% unstructured for every method',
                   all(inc(m, '2:4') > inc(m, '50%') for m in METHODS),
                   ', '.join(f"{METHODS[m]} {inc(m, '50%'):+.4f} -> {inc(m, '2:4'):+.4f}"
                             for m in METHODS)))
  verdicts.append((f'The {extra}-step recovery fine-tune narrows the gap to the dense model '
                   'trained as long, for every method', all(inc_ft(m, p) < inc(m, p) for m, p in by),
                   ', '.join(f'{METHODS[m]} {p} {inc(m, p):+.4f} -> {inc_ft(m, p):+.4f}'
                             for m, p in by)))
  kept = all(r['masks_kept'] for r in rows[1:])
  footer = (f'\nNon-zero params unchanged by the fine-tune in every run (masks fixed): '
            f"{'yes' if kept else 'NO'}.\n")
  common.report('oneshot', a, 'One-shot pruning: magnitude vs Wanda vs SparseGPT', meta, rows,
                body, verdicts, footer)


if __name__ == '__main__':
  main()
