"""The main job: dense vs MoE vs pruned language models under matched compute.

  python experiments/compare.py --preset=quick   # 1 seed, ~26 min on 2 CPU cores
  python experiments/compare.py --preset=full    # 3 seeds, 1.25x the tokens

Every model trains on the same tokens (same data seed) with the same optimizer on 8
simulated CPU devices; the MoE models run expert-parallel (expert axis 8). Models, all
relative to dense-small (d_ff = 4 d_model):

  dense-small   the baseline (every model uses Switch's 0.1x init scale)
  switch        top-1 over 8 experts, cf 1.25, MoE in every other block (same FLOPs/token)
  top2-half     top-2 over 8 experts of half width (same FLOPs/token)
  switch-dropless, top2-half-dropless
                the same two with dropless dispatch (no capacity, nothing dropped; expert
                axis 8 over the all_to_all transport)
  top2-full     top-2 over 8 full-width experts (same total params as switch, more FLOPs)
  large-sparse  8x FFN width, GMP-pruned to 87.5% in the FFN (same non-zero FFN params)
  structured    4x FFN width, 75% of FFN neurons GMP-pruned, then compacted to dense-small's
                shape (the compacted model's loss is checked to equal the masked one's)
  dense-large   FFN widened until total params equal switch's

Three views of one table: matched FLOPs per token (active / non-zero), matched step time
(loss at dense-small's wall-clock budget), matched total parameters. Writes
experiments/results/compare_<preset>.{md,csv,json,png} and prints the markdown.
Workdirs under runs/compare_<preset>/ resume after a crash; rerunning reuses finished runs.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx

from sparse_jax.analysis.accounting import flops_from_config, params_from_config
from sparse_jax.config import model_spec
from sparse_jax.models import TransformerLM
from sparse_jax.pruning.compaction import compact
from sparse_jax.training import loop

import common
import timing
from common import curve_at, fmt, mean_std, steps_to

SEEDS = {'smoke': [0], 'quick': [0], 'full': [0, 1, 2]}
BYTES_PER_PARAM = 4                                   # float32 parameters


def model_configs(c) -> dict:
  """name -> (config, matched-on view), all derived from dense-small `c`."""
  d_ff = c.model.d_ff
  out = {'dense-small': (c, 'baseline'),
         'switch': (common.moe(c, 8, k=1), 'FLOPs'),
         'top2-half': (common.moe(c, 8, k=2, d_ff=d_ff // 2), 'FLOPs'),
         'switch-dropless': (common.moe(c, 8, k=1, dispatch='dropless'), 'FLOPs'),
         'top2-half-dropless': (common.moe(c, 8, k=2, d_ff=d_ff // 2, dispatch='dropless'),
                                'FLOPs'),
         'top2-full': (common.moe(c, 8, k=2), 'total params')}
  for name, width, sparsity, structure in (('large-sparse', 8, 0.875, ''),
                                           ('structured', 4, 0.75, 'ffn_neurons')):
    p = common.gmp(common.override(c, model=dict(d_ff=width * d_ff)), sparsity,
                   targets='ffn', structure=structure)
    out[name] = (p, 'non-zero FLOPs' if not structure else 'FLOPs after compaction')
  # Dense-large: the FFN width (a multiple of 16) giving switch's total parameters; a dense
  # model's total is linear in d_ff.
  total = lambda config: params_from_config(model_spec(config))['total']
  fixed = total(common.override(c, model=dict(d_ff=0)))
  per_neuron = (total(c) - fixed) / d_ff
  switch_total = total(out['switch'][0])
  big = common.override(c, model=dict(d_ff=int(round((switch_total - fixed) / per_neuron / 16))
                                      * 16))
  out['dense-large'] = (big, 'total params')
  return out


def compacted(result):
  """(compacted spec, masked val loss, compacted val loss) of a finished structured run.
  Kept neurons are the columns of wi [D, F] that pruning left non-zero; the compacted
  model has no pruner (nothing is left to prune)."""
  spec, model, mesh = common.load(result)
  masked = loop.evaluate(spec, model, mesh)['loss']
  kept = {}
  for i, block in enumerate(model.blocks):
    wi = np.asarray(block.ffn.wi[...])                                  # [D, F]
    kept[('blocks', i, 'ffn')] = np.flatnonzero(np.any(wi != 0, axis=0))
  small_model, small_state = compact(spec.model, nnx.state(model), kept)
  small_spec = dataclasses.replace(spec, model=small_model, pruning=None)
  with jax.set_mesh(mesh):
    small = TransformerLM(small_model, mesh=mesh, rngs=nnx.Rngs(0))
  nnx.update(small, small_state)
  return small_spec, masked, loop.evaluate(small_spec, small, mesh)['loss']


def main(argv=None):
  common.setup_devices(8)
  a = common.study_args(__doc__, argv)
  base = common.sized(a.preset)
  seeds = SEEDS[a.preset]
  meta = common.provenance(seeds)
  variants = model_configs(base)
  results = common.run_seeds('compare', a, {name: c for name, (c, _) in variants.items()},
                             seeds)
  for seed, r in zip(seeds, results['structured']):
    small, r['masked_loss'], r['compacted_loss'] = compacted(r)
    print(f'structured seed {seed}: val loss masked {r["masked_loss"]:.5f}, '
          f'compacted {r["compacted_loss"]:.5f}')
  # Step time does not depend on the seed: the first seed's runs stand for all.
  timed = {name: runs[0]['spec'] for name, runs in results.items()}
  timed['structured (compacted)'] = small
  sec = timing.step_times(timed, n=timing.timed_steps(a.preset))

  rows = summarize(variants, results, sec, small.model)
  path = common.report('compare', a, f'Dense vs MoE vs pruned under matched compute '
                       f'({a.preset})', meta | {'step_seconds': sec}, rows,
                       render(rows, base, sec))
  plot(rows, sec, base, a.out / f'compare_{a.preset}.png')
  print(f'wrote {path} (+ .csv .json .png)')


def summarize(variants, results, sec, small) -> list[dict]:
  """One row per model; small is the compacted structured model's ModelSpec."""
  base_runs, t0 = results['dense-small'], sec['dense-small']
  base_steps = base_runs[0]['steps']
  seq_len = base_runs[0]['spec'].train.seq_len
  train_flops = lambda m: flops_from_config(m, seq_len)['train']
  rows = []
  for name, (c, view) in variants.items():
    runs = results[name]
    shape = small if name == 'structured' else model_spec(c)   # deployed shape
    counts = params_from_config(shape)
    emb = counts['embedding']
    flops = train_flops(model_spec(c))
    nonzero = [r['nonzero_params'] - emb for r in runs if 'nonzero_params' in r]
    nz_flops = train_flops(_nonzero_equivalent(c)) if nonzero else flops
    if name == 'structured':
      nonzero, nz_flops = [], train_flops(small)
    to_target = [steps_to(r['curve'], b['val_loss']) for r, b in zip(runs, base_runs)]
    at_clock = [curve_at(r['curve'], base_steps * t0 / sec[name]) for r in runs]
    row = dict(model=name, matched_on=view, total_params=counts['total'],
               active_params=counts['active'],
               nonzero_params=round(float(np.mean(nonzero))) if nonzero else counts['total'],
               param_bytes=BYTES_PER_PARAM * (counts['total'] + emb),
               train_flops=flops, nonzero_train_flops=nz_flops,
               step_time_ratio=sec[name] / t0)
    row['val_loss'], row['val_loss_std'] = mean_std([r['val_loss'] for r in runs])
    row['bpb'], _ = mean_std([r['bpb'] for r in runs])
    row['steps_to_target'], _ = mean_std(to_target)
    row['reached'] = f'{sum(x is not None for x in to_target)}/{len(runs)}'
    row['time_to_target'] = (row['steps_to_target'] * sec[name] / (base_steps * t0)
                             if row['reached'][0] != '0' else float('nan'))
    row['loss_at_base_clock'], _ = mean_std(at_clock)
    for key in ('dropped_fraction', 'max_violation'):
      row[key] = mean_std([r.get(key) for r in runs])[0]
    if name == 'structured':
      row['masked_val_loss'] = mean_std([r['masked_loss'] for r in runs])[0]
      row['compacted_val_loss'] = mean_std([r['compacted_loss'] for r in runs])[0]
    row['curves'] = [r['curve'] for r in runs]
    rows.append(row)
  return rows


def _nonzero_equivalent(c):
  """The dense shape (a ModelSpec) with as many FFN FLOPs as c's non-zero FFN weights."""
  m = model_spec(c)
  return dataclasses.replace(m, d_ff=round(m.d_ff * (1 - c.pruning.sparsity)))


def render(rows, base, sec) -> str:
  t = base.train
  emb = params_from_config(model_spec(base))['embedding']
  out = (f'Byte-level LM, d_model {base.model.d_model}, {base.model.num_layers} layers, '
         f'{t.steps} steps of {t.batch_size}x{t.seq_len} tokens, AdamW lr {t.lr}, '
         f'validation on {t.eval_batches} batches. Params exclude embeddings '
         f'({emb:,}); param memory includes them (fp32). '
         "Time = measured step time (interleaved, random tokens) x steps, relative to "
         "dense-small's whole run.\n\n")
  cols = ['model', 'matched on', 'total params', 'active / token', 'non-zero', 'param memory',
          'train FLOPs / token (non-zero)', 'step time', 'val loss', 'bits / byte',
          "steps to dense-small's loss", 'time to it', "loss at dense-small's time",
          'dropped', 'max violation']
  body = []
  for r in rows:
    moe_cols = [fmt(r['dropped_fraction'], digits=3), fmt(r['max_violation'], digits=2)]
    body.append([
        r['model'], r['matched_on'], f"{r['total_params']:,}", f"{r['active_params']:,}",
        f"{r['nonzero_params']:,}", f"{r['param_bytes'] / 2**20:.1f} MiB",
        f"{r['train_flops']:.3g} ({r['nonzero_train_flops']:.3g})",
        f"{r['step_time_ratio']:.2f}x", fmt(r['val_loss'], r['val_loss_std']),
        fmt(r['bpb'], digits=3),
        f"{r['steps_to_target']:.0f} ({r['reached']})" if r['reached'][0] != '0'
        else f"not reached (0/{r['reached'][-1]})",
        f"{r['time_to_target']:.2f}x" if r['time_to_target'] == r['time_to_target'] else '–',
        fmt(r['loss_at_base_clock']), *moe_cols])
  out += common.table(cols, body)
  s = next(r for r in rows if r['model'] == 'structured')
  out += (f"\nstructured: masked 4x model val loss {s['masked_val_loss']:.5f}, compacted "
          f"{s['compacted_val_loss']:.5f}; the compacted model trains at "
          f"{sec['structured (compacted)'] / sec['dense-small']:.2f}x dense-small's step time "
          '(its step-time column is the masked 4x model it was trained as).\n')
  out += _views(rows)
  return out


def _views(rows) -> str:
  by = {r['model']: r for r in rows}
  loss = lambda n: fmt(by[n]['val_loss'], by[n]['val_loss_std'])
  out = '\n## The three views\n\n'
  out += '- **Matched FLOPs per token** (vs dense-small ' + loss('dense-small') + '): ' + ', '.join(
      f'{n} {loss(n)}' for n in ('switch', 'top2-half', 'switch-dropless',
                                 'top2-half-dropless', 'large-sparse', 'structured')) + '.\n'
  clock = sorted(rows, key=lambda r: (r['loss_at_base_clock'] != r['loss_at_base_clock'],
                                      r['loss_at_base_clock']))
  out += ("- **Matched step time** (val loss after dense-small's wall-clock): " + ', '.join(
      f"{r['model']} {fmt(r['loss_at_base_clock'])}" for r in clock) + '.\n')
  out += ('- **Matched total parameters** (switch ' + f"{by['switch']['total_params']:,}): "
          + ', '.join(f"{n} {loss(n)} ({by[n]['total_params']:,})"
                      for n in ('switch', 'top2-full', 'dense-large')) + '.\n')
  return out


def plot(rows, sec, base, path):
  """Validation loss (mean over seeds) vs training FLOPs and vs wall-clock."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  tokens = base.train.batch_size * base.train.seq_len
  budget = sec['dense-small'] * base.train.steps
  for r in rows:
    steps = np.array([s for s, _ in r['curves'][0]], float)
    loss = np.array([[y for _, y in c] for c in r['curves']]).mean(0)
    axes[0].plot(steps * tokens * r['nonzero_train_flops'], loss, marker='.', label=r['model'])
    axes[1].plot(steps * sec[r['model']] / budget, loss, marker='.', label=r['model'])
  axes[0].set(xlabel='training FLOPs (non-zero weights only)',
              ylabel='validation loss (nats / byte)')
  axes[1].set(xlabel="wall-clock / dense-small's whole run", ylabel='validation loss (nats / byte)')
  for ax in axes:
    ax.grid(alpha=0.3)
  axes[1].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


if __name__ == '__main__':
  main()
