"""MoE layer cost, measured side by side in one run.

  1. forward+backward time of the MoE layer (top-1, E=8) / a dense FFN with the same
     D and F (so the same active FLOPs per token), per backend and capacity factor;
  2. compiled memory of 'index' vs 'einsum' as the tokens of one group grow, with the
     growth exponent (1 = linear in tokens, 2 = quadratic);
  3. on the 8-device mesh, the expert-parallel layer (expert axis 8) vs the same layer
     with expert axis 1 (data parallel only), with the bytes each all-to-all sends.

  python experiments/bench_moe_layer.py            # T=8192, D=512, F=2048
  python experiments/bench_moe_layer.py --quick    # smaller, ~1 minute
  python experiments/bench_moe_layer.py --json out.json
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import sparse_jax as sj

import common

SEEDS = (0, 1)              # jax.random keys of inputs and cotangents; nnx.Rngs(0) weights


def fwd_bwd(module, x):
  """Jitted (params, x) -> (loss, grads) of loss = sum(y * ct): one training step's FFN.

  The loss value is returned so the forward output is really computed: with grads
  alone XLA drops the dense FFN's last forward matmul (the loss is linear in it),
  while the MoE layer needs it for the router's gradient.
  """
  graphdef, params = nnx.split(module)
  ct = jax.random.normal(jax.random.key(1), x.shape, x.dtype)

  def loss(params, x):
    out = nnx.merge(graphdef, params)(x)
    y = out[0] if isinstance(out, tuple) else out
    return jnp.sum(y * ct)

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), params


def time_side_by_side(fns: dict, repeats: int) -> dict[str, float]:
  """Median seconds per call; calls interleaved round-robin so drift hits all alike."""
  for f in fns.values():
    jax.block_until_ready(f())                                  # compile + warm up
  times = {k: [] for k in fns}
  for _ in range(repeats):
    for k, f in fns.items():
      t = time.perf_counter()
      jax.block_until_ready(f())
      times[k].append(time.perf_counter() - t)
  return {k: statistics.median(v) for k, v in times.items()}


def bench_backends(t, d, f, e, repeats):
  x = jax.random.normal(jax.random.key(0), (1, t, d))
  dense = sj.layers.DenseFFN(d, f, rngs=nnx.Rngs(0))
  fns = {}
  g, p = fwd_bwd(dense, x)
  fns['dense'] = lambda g=g, p=p: g(p, x)
  for cf in (1.0, 1.25):
    for backend in sj.dispatch.BACKENDS:
      if backend == 'dropless' and cf != 1.0:
        continue                                   # no capacity: one row is enough
      layer = sj.moe.MoE(d, f, e, k=1, capacity_factor=cf, dispatch=backend)
      g, p = fwd_bwd(layer, x)
      fns[(backend, cf)] = lambda g=g, p=p: g(p, x)
  secs = time_side_by_side(fns, repeats)
  rows = []
  for key, s in secs.items():
    if key == 'dense':
      continue
    backend, cf = key
    rows.append(dict(backend=backend, capacity_factor=cf if backend != 'dropless' else None,
                     ratio_vs_dense=s / secs['dense']))
  return rows


def compiled_bytes(module, x):
  g, p = fwd_bwd(module, x)
  m = g.lower(p, x).compile().memory_analysis()
  return m.temp_size_in_bytes, (m.temp_size_in_bytes + m.argument_size_in_bytes +
                                m.output_size_in_bytes - m.alias_size_in_bytes)


def bench_memory(token_counts, d, f, e):
  rows = []
  for backend in ('index', 'einsum'):
    layer = sj.moe.MoE(d, f, e, k=1, capacity_factor=1.25, dispatch=backend)
    for t in token_counts:
      temp, peak = compiled_bytes(layer, jnp.zeros((1, t, d)))
      rows.append(dict(backend=backend, tokens=t, temp_mib=temp / 2**20,
                       peak_mib=peak / 2**20))
  # Exponent p of memory ~ T^p, fitted to the growth between successive sizes, so the
  # token-independent part (weights and their gradients) does not flatten the slope.
  exps = {}
  for backend in ('index', 'einsum'):
    r = [row for row in rows if row['backend'] == backend]
    growth = np.diff([x['temp_mib'] for x in r])
    exps[backend] = float(np.polyfit(np.log([x['tokens'] for x in r[1:]]),
                                     np.log(growth), 1)[0])
  return rows, exps


def bench_expert_parallel(t, d, f, e, repeats):
  n = jax.device_count()
  x = jax.random.normal(jax.random.key(0), (n, t // n, d))
  fns, sent = {}, {}
  for name, shape in (('expert axis 8', (1, n)), ('expert axis 1', (n, 1))):
    mesh = sj.sharding.make_mesh(data=shape[0], expert=shape[1])
    xs = jax.device_put(x, NamedSharding(mesh, P(('data', 'expert'))))
    layer = sj.moe.MoE(d, f, e, k=1, capacity_factor=1.25, mesh=mesh)
    g, p = fwd_bwd(layer, xs)
    fns[name] = lambda g=g, p=p, xs=xs: g(p, xs)
    c = sj.routing.capacity(t // n, e, 1, 1.25)
    sent[name] = c * e * d * 4 if shape[1] > 1 else 0          # [E, C, D] f32 per device
  secs = time_side_by_side(fns, repeats)
  base = secs['expert axis 1']
  return [dict(layout=k, ratio_vs_expert_axis_1=v / base,
               bytes_per_all_to_all_per_device=sent[k]) for k, v in secs.items()]


def main(argv=None):
  common.setup_devices(8)
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--quick', action='store_true', help='T=2048, D=256, F=1024')
  ap.add_argument('--repeats', type=int, default=None)
  ap.add_argument('--json', metavar='PATH', help='also write the results as JSON')
  a = ap.parse_args(argv)
  t, d, f, e = (2048, 256, 1024, 8) if a.quick else (8192, 512, 2048, 8)
  repeats = a.repeats or (5 if a.quick else 7)
  mem_tokens = [1024, 2048, 4096, 8192] if a.quick else [1024, 2048, 4096, 8192, 16384]
  meta = common.provenance(SEEDS, source=None)
  print(common.header('MoE layer benchmark', meta) +
        f'T={t} D={d} F={f} E={e} top-1; median of {repeats} interleaved runs.')
  res = dict(config=dict(tokens=t, d_model=d, d_ff=f, experts=e, repeats=repeats))
  res['backends'] = bench_backends(t, d, f, e, repeats)
  print('\n| backend | cf | fwd+bwd time / dense FFN |\n|---|---|---|')
  for r in res['backends']:
    print(f"| {r['backend']} | {r['capacity_factor'] or '-'} | {r['ratio_vs_dense']:.3f} |")
  res['memory'], res['memory_exponent'] = bench_memory(mem_tokens, d, f, e)
  print('\n| backend | tokens/group | temp MiB | peak MiB |\n|---|---|---|---|')
  for r in res['memory']:
    print(f"| {r['backend']} | {r['tokens']} | {r['temp_mib']:.1f} | {r['peak_mib']:.1f} |")
  print('memory growth exponent p (temp(2T) - temp(T) ~ T^p; 1 = linear): ' +
        ', '.join(f'{k} {v:.2f}' for k, v in res['memory_exponent'].items()))
  res['expert_parallel'] = bench_expert_parallel(t, d, f, e, repeats)
  print('\n| layout (8 devices) | fwd+bwd time / expert axis 1 | bytes per all-to-all '
        '(per device) |\n|---|---|---|')
  for r in res['expert_parallel']:
    print(f"| {r['layout']} | {r['ratio_vs_expert_axis_1']:.3f} | "
          f"{r['bytes_per_all_to_all_per_device']:,} |")
  if a.json:
    common.write_json(a.json, meta, **res)


if __name__ == '__main__':
  main()
