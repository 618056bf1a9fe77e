"""Compile time against depth, unrolled and scanned (model.scan_layers), and what each
train.remat policy leaves in XLA's compiled temporaries.

For 4, 8, 16 and 32 blocks (Switch pattern: MoE every other block, 8 experts, on a data 8
mesh of CPU devices), the seconds to lower and compile the train step and the one-token
decode step, the best of two fresh builds per depth and layout. Then, at 8 scanned blocks, the train
step's compiled temporary bytes under remat 'none', 'block' and 'dots' (XLA's memory
analysis, with XLA:CPU's memory-aware scheduler, which the whole run uses: see
docs/scaling.md). Random tokens; nothing is trained.

    python experiments/bench_compile.py [--quick] [--out experiments/results]
"""
from __future__ import annotations

import argparse
import pathlib
import time

import jax
import jax.numpy as jnp
from flax import nnx

from sparse_jax import sharding
from sparse_jax.config import load_config, resolve
from sparse_jax.inference.cache import Step
from sparse_jax.models import TransformerLM
from sparse_jax.training import loop, steps

import common

CONFIGS = common.ROOT / 'configs'
REPEATS = 2


def _config(layers: int, scan: bool, remat: str = 'none', quick: bool = False):
  c = load_config(CONFIGS / 'switch.py')
  c = common.override(c, model=dict(num_layers=layers, d_model=64 if quick else 128,
                                    num_heads=2, d_ff=128 if quick else 256,
                                    scan_layers=scan),
                      moe=dict(num_experts=8, d_ff=128 if quick else 256),
                      train=dict(batch_size=16 if quick else 32, seq_len=64 if quick else 128,
                                 remat=remat),
                      mesh=dict(data=8, expert=1))
  return resolve(c, jax.device_count())


def _train_compile(spec):
  """(seconds to lower and compile the train step, its compiled temporary bytes)."""
  mesh = loop.make_mesh(spec)
  s = steps.build(spec, mesh)
  t = spec.train
  batch = jax.ShapeDtypeStruct((t.batch_size, t.seq_len), jnp.int32,
                               sharding=sharding.batch_sharding(mesh))
  t0 = time.perf_counter()
  compiled = s.train.lower(s.state, {'inputs': batch, 'targets': batch}).compile()
  seconds = time.perf_counter() - t0
  return seconds, steps.memory(s, compiled)['compiled_temp_bytes']


def _decode_compile(spec) -> float:
  """Seconds to lower and compile one decode step (a token per row, 64 cache slots)."""
  model = TransformerLM(spec.model, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  rows = 8
  cache = jax.eval_shape(lambda: model.init_cache(rows, 64))

  def step(state, token, cache, slot):
    return nnx.merge(graphdef, state).decode(token, cache, Step(slot, jnp.zeros((rows,),
                                                                                jnp.int32)))

  t0 = time.perf_counter()
  jax.jit(step).lower(state, jax.ShapeDtypeStruct((rows, 1), jnp.int32), cache,
                      jax.ShapeDtypeStruct((), jnp.int32)).compile()
  return time.perf_counter() - t0


def main(argv=None):
  common.setup_devices(8, memory_aware_cpu_scheduler=True)
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--quick', action='store_true', help='4 and 8 blocks, smaller widths')
  ap.add_argument('--out', type=pathlib.Path, default=None,
                  help='write bench_compile.{md,csv,json} here')
  a = ap.parse_args(argv)
  depths = (4, 8) if a.quick else (4, 8, 16, 32)
  meta = common.provenance([0], source=None)
  rows = []
  _train_compile(_config(depths[0], False, quick=a.quick))     # warm-up: first-use costs
  for layers in depths:
    for scan in (False, True):
      spec = _config(layers, scan, quick=a.quick)
      # The best of REPEATS builds (each a new function: nothing comes from a cache).
      train = [_train_compile(spec) for _ in range(REPEATS)]
      rows.append(dict(kind='compile', layers=layers, scan_layers=scan, remat='none',
                       train_compile_s=min(t for t, _ in train),
                       decode_compile_s=min(_decode_compile(spec) for _ in range(REPEATS)),
                       compiled_temp_bytes=train[0][1]))
      print(rows[-1], flush=True)
  for r in rows:
    base = next(b for b in rows if b['layers'] == depths[0] and b['scan_layers'] == r['scan_layers'])
    r['train_vs_fewest'] = r['train_compile_s'] / base['train_compile_s']
    r['decode_vs_fewest'] = r['decode_compile_s'] / base['decode_compile_s']
  remat = []
  for policy in ('none', 'block', 'dots'):
    _, temp = _train_compile(_config(8, True, policy, quick=a.quick))
    remat.append(dict(kind='remat', layers=8, scan_layers=True, remat=policy,
                      compiled_temp_bytes=temp))
  for r in remat:
    r['temp_vs_none'] = r['compiled_temp_bytes'] / remat[0]['compiled_temp_bytes']
  spec = _config(depths[0], True, quick=a.quick)
  md = common.header('Compile time against depth; remat temporaries', meta)
  md += (f"Switch pattern (MoE every other block, 8 experts), d_model {spec.model.d_model}, "
         f"batch {spec.train.batch_size} x {spec.train.seq_len}, mesh data 8 (CPU devices); "
         f"decode: 8 rows, 64 cache slots; seconds of lower + compile, the best of "
         f"{REPEATS} builds; XLA flag {common.MEMORY_AWARE_CPU_SCHEDULER}.\n\n")
  md += common.table(
      ['blocks', 'layout', 'train step compile (s)', f'/ {depths[0]} blocks',
       'decode step compile (s)', f'/ {depths[0]} blocks'],
      [[r['layers'], 'scanned' if r['scan_layers'] else 'unrolled',
        f"{r['train_compile_s']:.2f}", f"{r['train_vs_fewest']:.2f}",
        f"{r['decode_compile_s']:.2f}", f"{r['decode_vs_fewest']:.2f}"] for r in rows])
  md += '\n8 scanned blocks, train step, compiled temporaries by train.remat:\n\n'
  md += common.table(['remat', 'compiled temp bytes', '/ none'],
                     [[r['remat'], f"{r['compiled_temp_bytes']:,}", f"{r['temp_vs_none']:.3f}"]
                      for r in remat])
  print(md)
  if a.out:
    common.write_results('bench_compile', md, rows + remat, meta, a.out)


if __name__ == '__main__':
  main()
