"""MoE layer cost, measured side by side in one run.

  1. forward+backward time of the MoE layer (top-1, E=8) / a dense FFN with the same
     D and F (so the same active FLOPs per token), per backend and capacity factor, the
     dropless backend with each grouped matmul; and top-2 dropless / a dense FFN of
     twice the width (the same active FLOPs);
  2. compiled memory of 'index', 'einsum' and 'dropless' as the tokens of one group grow,
     with the growth exponent (1 = linear in tokens, 2 = quadratic);
  3. on the 8-device mesh, the expert-parallel layer (expert axis 8) vs the same layer
     with expert axis 1 (data parallel only), with the bytes each all-to-all sends;
  4. on the 8-device mesh (expert axis 8), each dropless transport vs the capacity
     all-to-all (cf 1.25): time, bytes handed to collectives per device per layer
     forward, and XLA's compiled temporary memory.

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
from sparse_jax.grouped_matmul import GROUPED_MATMULS

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
  """Rows (backend, grouped matmul, k, cf, ratio to the dense FFN of the same active
  FLOPs: width F for top-1, 2F for top-2)."""
  x = jax.random.normal(jax.random.key(0), (1, t, d))
  fns = {}
  for width in (f, 2 * f):
    g, p = fwd_bwd(sj.layers.DenseFFN(d, width, rngs=nnx.Rngs(0)), x)
    fns[('dense', width)] = lambda g=g, p=p: g(p, x)
  cases = [dict(dispatch=b, capacity_factor=cf) for cf in (1.0, 1.25)
           for b in sj.dispatch.CAPACITY_BACKENDS]
  cases += [dict(dispatch='dropless', grouped_matmul=gm, k=k)
            for k in (1, 2) for gm in GROUPED_MATMULS]
  for case in cases:
    g, p = fwd_bwd(sj.moe.MoE(d, f, e, **{'k': 1, **case}), x)
    fns[tuple(case.items())] = lambda g=g, p=p: g(p, x)
  secs = time_side_by_side(fns, repeats)
  rows = []
  for case in cases:
    k = case.get('k', 1)
    rows.append(dict(backend=case['dispatch'], grouped_matmul=case.get('grouped_matmul'),
                     k=k, capacity_factor=case.get('capacity_factor'),
                     ratio_vs_dense=secs[tuple(case.items())] / secs[('dense', k * f)]))
  return rows


def compiled_bytes(module, x):
  g, p = fwd_bwd(module, x)
  m = g.lower(p, x).compile().memory_analysis()
  return m.temp_size_in_bytes, (m.temp_size_in_bytes + m.argument_size_in_bytes +
                                m.output_size_in_bytes - m.alias_size_in_bytes)


MEMORY_BACKENDS = ('index', 'einsum', 'dropless')


def bench_memory(token_counts, d, f, e):
  rows = []
  for backend in MEMORY_BACKENDS:
    layer = sj.moe.MoE(d, f, e, k=1, capacity_factor=1.25, dispatch=backend)
    for t in token_counts:
      temp, peak = compiled_bytes(layer, jnp.zeros((1, t, d)))
      rows.append(dict(backend=backend, tokens=t, temp_mib=temp / 2**20,
                       peak_mib=peak / 2**20))
  # Exponent p of memory ~ T^p, fitted to the growth between successive sizes, so the
  # token-independent part (weights and their gradients) does not flatten the slope.
  exps = {}
  for backend in MEMORY_BACKENDS:
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


def collective_bytes(transport, tokens, k, e, p, d, capacity, spill=0, itemsize=4):
  """Bytes one device hands to collectives in one layer's forward (the whole buffers,
  its own share included, as for the capacity path's 2 * E*C*D); spill: the rows per
  destination of 'sized''s spill buffers in this step (0: none)."""
  r = tokens * min(k, e // p)                       # expert_parallel.worst_case_rows
  rows = lambda n: 2 * p * n * d * itemsize + p * n * 4            # there and back, ids
  return {'capacity': 2 * e * capacity * d * itemsize,
          'all_to_all': rows(r),
          'sized': 2 * e * capacity * d * itemsize + 4 + rows(spill),   # + the spill size
          'all_gather': 2 * p * tokens * d * itemsize + p * tokens * k * 8,   # + ids, weights
          }[transport]


def bench_transports(t, d, f, e, repeats):
  """Dropless transports vs the capacity all-to-all, expert axis 8, top-1 and top-2."""
  n = jax.device_count()
  mesh = sj.sharding.make_mesh(data=1, expert=n)
  x = jax.device_put(jax.random.normal(jax.random.key(0), (n, t // n, d)),
                     NamedSharding(mesh, P(('data', 'expert'))))
  fns, info = {}, {}
  for k in (1, 2):
    cases = {'capacity': dict(capacity_factor=1.25)}
    cases |= {tr: dict(dispatch='dropless', ep_transport=tr, capacity_factor=1.25)
              for tr in ('all_to_all', 'sized', 'all_gather')}
    for name, kw in cases.items():
      layer = sj.moe.MoE(d, f, e, k=k, mesh=mesh, **kw)
      g, p = fwd_bwd(layer, x)
      fns[(name, k)] = lambda g=g, p=p: g(p, x)
      temp = g.lower(p, x).compile().memory_analysis().temp_size_in_bytes
      c = sj.routing.capacity(t // n, e, k, 1.25)
      spill = _spill_rows(layer, x, k, e, n) if name == 'sized' else None
      info[(name, k)] = dict(temp_mib=temp / 2**20, spill=spill, bytes=collective_bytes(
          name, t // n, k, e, n, d, c, spill or 0))
  secs = time_side_by_side(fns, repeats)
  return [dict(transport=name, k=k, ratio_vs_capacity=s / secs[('capacity', k)],
               collective_bytes_per_device=info[(name, k)]['bytes'],
               temp_mib=info[(name, k)]['temp_mib'], spill_rows=info[(name, k)]['spill'])
          for (name, k), s in secs.items()]


def _spill_rows(layer, x, k, e, n) -> int:
  """The rows per destination of the buffers 'sized' sends the choices past capacity in
  for this input (0: nothing past capacity): the first of spill_rows that holds the
  most any device (row of x) has for one destination."""
  plan, _ = layer.route(x)
  expert, kept = np.asarray(plan.expert), np.asarray(plan.kept)      # [n, S, K]
  c = sj.routing.capacity(x.shape[1], e, k, 1.25)
  need = max((np.maximum(np.bincount(expert[i][kept[i]], minlength=e) - c, 0)
              .reshape(n, -1).sum(1).max()) for i in range(n))
  sizes = sj.expert_parallel.spill_rows(e // n * c, x.shape[1] * min(k, e // n))
  return 0 if need == 0 else next(r for r in sizes if r >= need)


def main(argv=None):
  common.setup_devices(8)
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--quick', action='store_true', help='T=2048, D=256, F=1024')
  ap.add_argument('--repeats', type=int, default=None)
  ap.add_argument('--json', metavar='PATH', help='also write the results as JSON')
  ap.add_argument('--only_transports', action='store_true',
                  help='only part 4, the dropless transports against capacity dispatch')
  a = ap.parse_args(argv)
  t, d, f, e = (2048, 256, 1024, 8) if a.quick else (8192, 512, 2048, 8)
  repeats = a.repeats or (5 if a.quick else 7)
  mem_tokens = [1024, 2048, 4096, 8192] if a.quick else [1024, 2048, 4096, 8192, 16384]
  meta = common.provenance(SEEDS, source=None)
  print(common.header('MoE layer benchmark', meta) +
        f'T={t} D={d} F={f} E={e} top-1; median of {repeats} interleaved runs.')
  res = dict(config=dict(tokens=t, d_model=d, d_ff=f, experts=e, repeats=repeats))
  if not a.only_transports:
    _layer_parts(res, t, d, f, e, repeats, mem_tokens)
  res['transports'] = bench_transports(t, d, f, e, repeats)
  print('\n| dispatch over expert axis 8 | k | fwd+bwd time / capacity all-to-all | bytes to '
        'collectives per device per layer (fwd) | compiled temp MiB | sized: spill rows |'
        '\n|---|---|---|---|---|---|')
  for r in res['transports']:
    print(f"| {r['transport']} | {r['k']} | {r['ratio_vs_capacity']:.3f} | "
          f"{r['collective_bytes_per_device']:,} | {r['temp_mib']:.1f} | "
          f"{'-' if r['spill_rows'] is None else r['spill_rows']} |")
  if a.json:
    common.write_json(a.json, meta, **res)


def _layer_parts(res, t, d, f, e, repeats, mem_tokens):
  """Parts 1-3 of the module docstring, printed and added to res."""
  res['backends'] = bench_backends(t, d, f, e, repeats)
  print('\n| backend | grouped matmul | k | cf | fwd+bwd time / dense FFN of the same active '
        'FLOPs |\n|---|---|---|---|---|')
  for r in res['backends']:
    print(f"| {r['backend']} | {r['grouped_matmul'] or '-'} | {r['k']} | "
          f"{r['capacity_factor'] or '-'} | {r['ratio_vs_dense']:.3f} |")
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


if __name__ == '__main__':
  main()
