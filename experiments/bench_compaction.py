"""Forward time of a compacted model vs the masked model it came from, side by side.

Structured pruning of FFN neurons only zeroes weights, so the masked model costs what the
dense one did; compaction (sparse_jax.pruning.compaction) gathers the kept neurons into a
smaller model. The ideal time ratio compact/masked is the ratio of forward FLOPs per token.

  python experiments/bench_compaction.py [--quick] [--json out.json]
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np
from flax import nnx

from sparse_jax.analysis.accounting import flops_from_config
from sparse_jax.config import load_config, model_spec
from sparse_jax.models import TransformerLM
from sparse_jax.pruning.compaction import compact

import common

CONFIGS = common.ROOT / 'configs'
SEEDS = (0, 1)               # random tokens and weights (0), the kept neurons (1)


def forward(model):
  graphdef, state = nnx.split(model)
  return jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)[0]), state


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--quick', action='store_true', help='configs/tiny.py sizes, dense')
  ap.add_argument('--repeats', type=int, default=10)
  ap.add_argument('--json', metavar='PATH')
  a = ap.parse_args(argv)
  c = load_config(CONFIGS / ('tiny.py' if a.quick else 'dense.py'))
  c.moe.num_experts = 0
  batch, length = (8, 32) if a.quick else (16, 256)
  tokens = np.random.default_rng(0).integers(0, 256, (batch, length)).astype(np.int32)
  spec = model_spec(c)
  model = TransformerLM(spec, rngs=nnx.Rngs(0))
  fns, rows = {}, []
  fns['masked'] = forward(model)       # zeros cost as much as any weight: time is the same
  rng = np.random.default_rng(1)
  for removed in (0.5, 0.75):
    n = round(c.model.d_ff * (1 - removed))
    # Which neurons are kept does not change the time; random ones keep this self-contained.
    kept = {('blocks', i, 'ffn'): rng.choice(c.model.d_ff, n, replace=False)
            for i in range(c.model.num_layers)}
    new_spec, new_state = compact(spec, nnx.state(model), kept)
    small = TransformerLM(new_spec, rngs=nnx.Rngs(0))
    nnx.update(small, new_state)
    fns[removed] = forward(small)
    rows.append(dict(removed=removed, d_ff=n,
                     flop_ratio=flops_from_config(new_spec, length)['forward'] /
                     flops_from_config(spec, length)['forward']))
  for f, s in fns.values():
    jax.block_until_ready(f(s, tokens))
  times = {k: [] for k in fns}
  for _ in range(a.repeats):
    for k, (f, s) in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(f(s, tokens))
      times[k].append(time.perf_counter() - t0)
  base = statistics.median(times['masked'])
  for r in rows:
    r['time_ratio'] = statistics.median(times[r['removed']]) / base
    # Share of the ideal saving (1 - FLOP ratio) that the measured time realises.
    r['saving_realised'] = (1 - r['time_ratio']) / (1 - r['flop_ratio'])
  meta = common.provenance(SEEDS, source=None)
  print(common.header('Compaction: forward time of the compacted model', meta) +
        f'd_model={c.model.d_model} layers={c.model.num_layers} d_ff={c.model.d_ff}, forward '
        f'on {batch}x{length} tokens; median of {a.repeats}\n')
  print('| FFN neurons removed | d_ff after | forward FLOPs compact/masked | '
        'time compact/masked | share of ideal saving |\n|---|---|---|---|---|')
  for r in rows:
    print(f"| {r['removed']:.0%} | {r['d_ff']} | {r['flop_ratio']:.3f} | "
          f"{r['time_ratio']:.3f} | {r['saving_realised']:.0%} |")
  if a.json:
    common.write_json(a.json, meta, rows=rows)


if __name__ == '__main__':
  main()
