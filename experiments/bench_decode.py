"""What sparsity buys at inference: prefill and decode speed of dense, MoE, quantised and
pruned models against the batch size, side by side in one run.

  python experiments/bench_decode.py --out experiments/results      # ~15 min on 2 cores
  python experiments/bench_decode.py --quick                        # seconds (tests)

Models (random weights, float32, every block's FFN as named; one CPU device):
  dense_small   FFN d_ff = F
  switch        E experts of d_ff F, top-1: dense_small's active parameters
  top2          E experts of d_ff F/2, top-2: the same active parameters
  dense_large   FFN d_ff = E*F: switch's total parameters
  int8          dense_small with int8 weight-only kernels (qwix.quantize, per output
                channel), dequantised inside the jitted step: int8 resident bytes
  pruned_50     dense_small, 50% of each kernel zeroed by magnitude (stored dense)
  pruned_2_4    dense_small, 2:4 by magnitude (stored dense)
Each (model, batch) runs sparse_jax.inference.generation.run (prefill of a prompt of P
tokens per row, then N-1 decode steps); the time is the best of --repeats interleaved runs
after a compiled warm-up. Decode time per token is one step's time (every row gets a
token). Next to it: resident parameter bytes, KV-cache bytes and the expected number of
experts a step touches per MoE layer, E*(1-(1-K/E)^B). A second table times the two MoE
decode paths (dispatch.chosen_experts: only the chosen experts' weights; dispatch.dropless:
sorted rows and a grouped matmul) on one layer against the token count, and the one
moe.generate_path picks.
"""
from __future__ import annotations

import argparse
import functools
import pathlib
import time
import warnings

import common

SIZES = {
    'full': dict(d_model=384, layers=4, heads=6, d_ff=1536, experts=8, prompt=32, new=9,
                 batches=(1, 4, 16, 64, 256), repeats=3, layer_tokens=(1, 2, 4, 8, 16, 64)),
    'quick': dict(d_model=32, layers=2, heads=2, d_ff=64, experts=4, prompt=8, new=3,
                  batches=(1, 4), repeats=1, layer_tokens=(1, 4)),
}
MODELS = ('dense_small', 'switch', 'top2', 'dense_large', 'int8', 'pruned_50', 'pruned_2_4')


def specs(size: dict) -> dict:
  from sparse_jax.config import base_config, model_spec
  out = {}
  e, f = size['experts'], size['d_ff']
  for name, moe, d_ff in (('dense_small', None, f), ('switch', (1, f), f),
                          ('top2', (2, f // 2), f), ('dense_large', None, e * f)):
    c = base_config()
    c.model.update(vocab_size=256, d_model=size['d_model'], num_layers=size['layers'],
                   num_heads=size['heads'], d_ff=d_ff, tie_embeddings=False)
    if moe:
      c.moe.update(num_experts=e, k=moe[0], d_ff=moe[1], dispatch='dropless', moe_every=1,
                   moe_offset=0)
    out[name] = model_spec(c)
  return out


def _kernels(model):
  from sparse_jax import roles
  named = roles.param_roles(model)
  return {p for p, r in named.items() if r.kernel and r.kind in roles.TARGET_KINDS['all']}


def pruned(model, n_m=None, sparsity=None):
  """model with each kernel pruned by magnitude along its input axis (in place)."""
  from flax import nnx
  from sparse_jax.pruning import oneshot
  kernels = _kernels(model)
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if path in kernels:
      var[...] = oneshot.magnitude(var[...], None, sparsity=sparsity, n_m=n_m)[0]
  return model


class Int8:
  """A model whose kernels are int8 + a float32 scale per output channel (qwix.quantize),
  made float32 again inside the jitted step: what a weight-only int8 model reads."""

  def __init__(self, model):
    import jax.numpy as jnp
    import qwix
    from flax import nnx
    self.graphdef, state = nnx.split(model)
    kernels = _kernels(model)
    self.quantised = {}
    for path, var in nnx.to_flat_state(state):
      if path in kernels:
        w = var[...]
        self.quantised[path] = qwix.quantize(w, jnp.int8, channelwise_axes=[w.ndim - 1])
    self.state = state

  def resident_bytes(self) -> int:
    import jax
    from flax import nnx
    kept = sum(v[...].nbytes for p, v in nnx.to_flat_state(self.state)
               if p not in self.quantised and hasattr(v[...], 'nbytes'))
    return kept + sum(x.nbytes for q in self.quantised.values() for x in jax.tree.leaves(q))


def dequantised_model(int8: Int8, quantised):
  import jax.numpy as jnp
  import qwix
  from flax import nnx
  state = nnx.to_flat_state(int8.state)
  flat = [(p, v.replace(qwix.dequantize(quantised[p]).astype(jnp.float32))
           if p in quantised else v) for p, v in state]
  return nnx.merge(int8.graphdef, nnx.from_flat_state(flat))


def _param_bytes(model) -> int:
  import jax
  from flax import nnx
  return sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _int8_step(int8: Int8, q, tokens, cache, slot):
  import jax.numpy as jnp
  from sparse_jax.inference.cache import Step
  from sparse_jax.inference.sampling import sample
  model = dequantised_model(int8, q)
  logits, cache = model.decode(tokens, cache, Step(slot, jnp.zeros(tokens.shape[0], jnp.int32)))
  return sample(logits[:, -1], None), cache


def _run_int8(int8: Int8, prompt, n):
  """generation.run's loop for the int8 model (equal-length prompts): the kernels enter
  the jitted prefill and decode steps as int8 and are dequantised there."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  b, p = prompt.shape
  length = -(-(p + n) // 64) * 64
  if not hasattr(int8, 'step'):                      # one jit: compiled once per shape
    int8.step = jax.jit(functools.partial(_int8_step, int8), donate_argnums=(2,))
    int8.init = jax.jit(lambda b, t: dequantised_model(int8, int8.quantised).init_cache(b, t),
                        static_argnums=(0, 1))
  cache = int8.init(b, length)
  t0 = time.perf_counter()
  token, cache = int8.step(int8.quantised, prompt, cache, jnp.int32(0))
  token.block_until_ready()
  t1 = time.perf_counter()
  for i in range(n - 1):              # each token to the host, as generation.run does
    np.asarray(token)
    token, cache = int8.step(int8.quantised, token[:, None], cache, jnp.int32(p + i))
  np.asarray(token)
  return t1 - t0, time.perf_counter() - t1


def kv_bytes(spec, batch: int, slots: int) -> int:
  return 2 * spec.num_layers * batch * slots * spec.kv_heads * spec.head_dim * 4


def expected_experts(spec, batch: int) -> float:
  if spec.moe is None:
    return float('nan')
  e, k = spec.moe.num_experts, spec.moe.k
  return e * (1 - (1 - k / e) ** batch)


def layer_paths(size: dict, repeats: int) -> list[dict]:
  """One MoE layer's two decode paths on the same routing plans, against T tokens."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from sparse_jax import dispatch
  from sparse_jax.moe import MoE, generate_path
  d, f, e = size['d_model'], size['d_ff'], size['experts']
  rows = []
  for k in (1, 2):
    layer = MoE(d, f // k, e, k=k, dispatch='dropless', rngs=nnx.Rngs(0))
    for t in size['layer_tokens']:
      x = jax.random.normal(jax.random.key(t), (1, t, d))

      def run(m, x, path):
        plan, _ = m.route(x)
        plan = type(plan)(*(a[0] for a in plan))
        w, xt = m.experts.weights(), x[0]
        if path == 'chosen':
          return dispatch.chosen_experts(xt, plan, w, m.experts.apply)
        return dispatch.dropless(xt, plan, e, functools.partial(m.experts.grouped_apply, w))

      fns = {p: nnx.jit(functools.partial(run, path=p)) for p in ('chosen', 'dropless')}
      outs = {p: fn(layer, x) for p, fn in fns.items()}
      assert jnp.allclose(outs['chosen'], outs['dropless'], atol=1e-5)
      best = {p: float('inf') for p in fns}
      for _ in range(repeats * 5):
        for p, fn in fns.items():
          t0 = time.perf_counter()
          fn(layer, x).block_until_ready()
          best[p] = min(best[p], time.perf_counter() - t0)
      rows.append(dict(k=k, tokens=t, chosen_ms=best['chosen'] * 1e3,
                       dropless_ms=best['dropless'] * 1e3,
                       chosen_over_dropless=best['chosen'] / best['dropless'],
                       generate_takes=generate_path(t, k, e)))
  return rows


def measure(size: dict) -> list[dict]:
  import jax
  import numpy as np
  from flax import nnx
  from sparse_jax.inference import generation
  from sparse_jax.models import TransformerLM
  base = specs(size)
  models = {n: TransformerLM(s, rngs=nnx.Rngs(0)) for n, s in base.items()}
  models['pruned_50'] = pruned(TransformerLM(base['dense_small'], rngs=nnx.Rngs(0)),
                               sparsity=0.5)
  models['pruned_2_4'] = pruned(TransformerLM(base['dense_small'], rngs=nnx.Rngs(0)),
                                n_m=(2, 4))
  int8 = Int8(TransformerLM(base['dense_small'], rngs=nnx.Rngs(0)))
  spec_of = dict(base, int8=base['dense_small'], pruned_50=base['dense_small'],
                 pruned_2_4=base['dense_small'])
  p, n = size['prompt'], size['new']
  rows = []
  for b in size['batches']:
    prompt = np.random.default_rng(b).integers(0, 256, (b, p), dtype=np.int32)

    def once(name):
      if name == 'int8':
        return _run_int8(int8, jax.numpy.asarray(prompt), n)
      _, t = generation.run(models[name], prompt, n)
      return t.prefill_s, t.decode_s

    best = {m: [float('inf'), float('inf')] for m in MODELS}
    for m in MODELS:                                   # compile and warm up
      once(m)
    for _ in range(size['repeats']):                   # interleaved: the same conditions
      for m in MODELS:
        pre, dec = once(m)
        best[m] = [min(best[m][0], pre), min(best[m][1], dec)]
    for m in MODELS:
      s = spec_of[m]
      zeros = sum(int((x == 0).sum()) for x in jax.tree.leaves(nnx.state(models[m], nnx.Param))
                  ) if m in models else 0
      rows.append(dict(
          model=m, batch=b, prefill_tokens_per_s=b * p / best[m][0],
          decode_ms_per_token=best[m][1] / (n - 1) * 1e3,
          decode_tokens_per_s=b * (n - 1) / best[m][1],
          param_bytes=int8.resident_bytes() if m == 'int8' else _param_bytes(models[m]),
          zero_params=zeros, kv_cache_bytes=kv_bytes(s, b, -(-(p + n) // 64) * 64),
          expected_experts_per_layer=expected_experts(s, b)))
  return rows


def plot(rows, path: pathlib.Path):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for m in MODELS:
    pts = [(r['batch'], r['decode_ms_per_token']) for r in rows if r['model'] == m]
    ax.plot(*zip(*pts), marker='o', label=m)
  ax.set(xscale='log', yscale='log', xlabel='batch (sequences decoded together)',
         ylabel='decode time per token (ms per step)')
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--quick', action='store_true')
  ap.add_argument('--out', type=pathlib.Path, default=None,
                  help='write bench_decode.{md,csv,json,png} here')
  a = ap.parse_args(argv)
  common.setup_devices(1)
  warnings.filterwarnings('ignore', category=DeprecationWarning, module='qwix')
  size = SIZES['quick' if a.quick else 'full']
  meta = common.provenance([0], source=None) | {'size': size}
  rows = measure(size)
  paths = layer_paths(size, size['repeats'])
  by = {(r['model'], r['batch']): r for r in rows}
  md = common.header('Decoding: what MoE, pruning and quantisation buy per batch size', meta)
  md += (f"d_model {size['d_model']}, {size['layers']} layers, {size['heads']} heads, "
         f"F = {size['d_ff']}, E = {size['experts']}; prompt {size['prompt']} tokens per "
         f"row, {size['new'] - 1} decode steps timed; best of {size['repeats']} interleaved "
         'runs. XLA:CPU, one device: times are ratios between rows, not accelerator '
         'figures.\n\n')
  md += common.table(
      ['model', 'batch', 'prefill tokens/s', 'decode ms/token', 'decode tokens/s',
       'parameter bytes', 'zero params', 'KV-cache bytes', 'expected experts / layer'],
      [[r['model'], r['batch'], f"{r['prefill_tokens_per_s']:,.0f}",
        f"{r['decode_ms_per_token']:.2f}", f"{r['decode_tokens_per_s']:,.0f}",
        f"{r['param_bytes']:,}", f"{r['zero_params']:,}", f"{r['kv_cache_bytes']:,}",
        '' if r['expected_experts_per_layer'] != r['expected_experts_per_layer']
        else f"{r['expected_experts_per_layer']:.2f}"] for r in rows])
  first = size['batches'][0]
  t = lambda m, b: by[(m, b)]['decode_ms_per_token']
  cross = next((b for b in size['batches'] if t('switch', b) >= t('dense_large', b)), None)
  summary = dict(
      switch_over_dense_small_b1=t('switch', first) / t('dense_small', first),
      switch_over_dense_large_b1=t('switch', first) / t('dense_large', first),
      top2_over_dense_small_b1=t('top2', first) / t('dense_small', first),
      int8_over_dense_small_b1=t('int8', first) / t('dense_small', first),
      switch_reaches_dense_large_at_batch=cross)
  md += (f"\nAt batch {first}: switch decodes in {summary['switch_over_dense_small_b1']:.2f}x "
         f"dense_small's time per token (target <= 1.2) and "
         f"{summary['switch_over_dense_large_b1']:.2f}x dense_large's (target <= 0.5); top2 "
         f"{summary['top2_over_dense_small_b1']:.2f}x dense_small; int8 "
         f"{summary['int8_over_dense_small_b1']:.2f}x dense_small. Switch's time per token "
         + (f'reaches dense_large\'s at batch {cross}.' if cross else
            'stays below dense_large\'s at every batch measured.') + '\n')
  md += ('\n## The two MoE decode paths, one layer\n\nThe same routing plan through '
         '`dispatch.chosen_experts` (gathers the chosen experts\' weights: T*K matrices) and '
         '`dispatch.dropless` (sorted rows, grouped matmul over all E); best of '
         f"{size['repeats'] * 5} interleaved calls. MoE.generate takes the chosen path while "
         '2*T*K < E (`moe.generate_path`).\n\n')
  md += common.table(['K', 'tokens T', 'chosen ms', 'dropless ms', 'chosen / dropless',
                      'MoE.generate takes'],
                     [[r['k'], r['tokens'], f"{r['chosen_ms']:.3f}", f"{r['dropless_ms']:.3f}",
                       f"{r['chosen_over_dropless']:.2f}", r['generate_takes']] for r in paths])
  print(md)
  if a.out:
    common.write_results('bench_decode', md, rows, meta | {'summary': summary,
                                                           'layer_paths': paths}, a.out)
    plot(rows, a.out / 'bench_decode.png')
  return rows, paths, summary


if __name__ == '__main__':
  main()
