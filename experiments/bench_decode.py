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
Each (model, batch) prefills a prompt of P tokens per row, then decodes N-1 steps, with
the model's own decode() jitted as sparse_jax.inference.generation does (greedy, each
token to the host), one loop for every model so that the int8 kernels can enter the steps
as int8; the time is the best of the repeats, interleaved, after a compiled warm-up.
Decode time per token is one step's time (every row gets a token). Next to it: resident
parameter bytes, KV-cache bytes and the expected number of experts a step touches per MoE
layer, E*(1-(1-K/E)^B). A second table decodes switch and top2 with MoE.generate's path
forced to each of its two (dispatch.chosen_experts: only the chosen experts' weights;
the dropless layer: sorted rows and a grouped matmul) against the batch, next to the one
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
                 batches=(1, 4, 16, 64, 256), repeats=3, path_batches=(1, 2, 3, 4, 8)),
    'quick': dict(d_model=32, layers=2, heads=2, d_ff=64, experts=4, prompt=8, new=3,
                  batches=(1, 4), repeats=1, path_batches=(1, 2)),
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


def _step(model_of, path, params, tokens, cache, slot):
  """One jitted decode (or prefill) call of the model model_of(params) builds; `path`
  forces MoE.generate's path while it is traced (None: moe.generate_path decides)."""
  import jax.numpy as jnp
  from sparse_jax import moe
  from sparse_jax.inference.cache import Step
  from sparse_jax.inference.sampling import sample
  rule = moe.generate_path
  if path is not None:
    moe.generate_path = lambda *a, **k: path
  try:
    start = jnp.zeros(tokens.shape[0], jnp.int32)
    logits, cache = model_of(params).decode(tokens, cache, Step(slot, start))
  finally:
    moe.generate_path = rule
  return sample(logits[:, -1], None), cache


class Loop:
  """generation.run's loop (equal-length prompts, greedy, each token to the host) around
  a model rebuilt inside the jitted steps by model_of(params): the int8 model enters them
  as int8 kernels, and `path` forces the decode steps' MoE path."""

  def __init__(self, model_of, params, path=None):
    import jax
    self.params = params
    self.prefill = jax.jit(functools.partial(_step, model_of, None), donate_argnums=(2,))
    self.decode = jax.jit(functools.partial(_step, model_of, path), donate_argnums=(2,))
    # the parameters as an argument, as the steps take them
    self.init = jax.jit(lambda params, b, t: model_of(params).init_cache(b, t),
                        static_argnums=(1, 2))

  def __call__(self, prompt, n):
    import jax.numpy as jnp
    import numpy as np
    b, p = prompt.shape
    cache = self.init(self.params, b, slots(p, n))
    t0 = time.perf_counter()
    token, cache = self.prefill(self.params, prompt, cache, jnp.int32(0))
    token.block_until_ready()
    t1 = time.perf_counter()
    for i in range(n - 1):
      np.asarray(token)
      token, cache = self.decode(self.params, token[:, None], cache, jnp.int32(p + i))
    np.asarray(token)
    return t1 - t0, time.perf_counter() - t1


def slots(prompt: int, new: int) -> int:
  """Cache slots for a prompt and new tokens: rounded up to 64, as generation does."""
  return -(-(prompt + new) // 64) * 64


def kv_bytes(spec, batch: int, length: int) -> int:
  return 2 * spec.num_layers * batch * length * spec.kv_heads * spec.head_dim * 4


def expected_experts(spec, batch: int) -> float:
  if spec.moe is None:
    return float('nan')
  e, k = spec.moe.num_experts, spec.moe.k
  return e * (1 - (1 - k / e) ** batch)


def decode_paths(size: dict, models: dict, base: dict) -> list[dict]:
  """Decode time per token of switch and top2 with MoE.generate's path forced to each of
  'chosen' and 'dropless', against the batch (the tokens a decode step routes)."""
  import jax
  import numpy as np
  from sparse_jax.moe import generate_path
  p, n, e = size['prompt'], size['new'], size['experts']
  rows = []
  for name in ('switch', 'top2'):
    loops = {path: loop_of(models[name], path) for path in ('chosen', 'dropless')}
    for b in size['path_batches']:
      prompt = jax.numpy.asarray(np.random.default_rng(b).integers(0, 256, (b, p), np.int32))
      best = {path: float('inf') for path in loops}
      for loop in loops.values():                      # compile and warm up
        loop(prompt, n)
      for _ in range(size['repeats']):
        for path, loop in loops.items():
          best[path] = min(best[path], loop(prompt, n)[1] / (n - 1))
      k = base[name].moe.k
      rows.append(dict(model=name, k=k, batch=b, chosen_ms=best['chosen'] * 1e3,
                       dropless_ms=best['dropless'] * 1e3,
                       chosen_over_dropless=best['chosen'] / best['dropless'],
                       generate_takes=generate_path(b, k, e)))
  return rows


def build(base: dict) -> dict:
  """The seven models of MODELS from the four specs (int8: an Int8)."""
  from flax import nnx
  from sparse_jax.models import TransformerLM
  models = {n: TransformerLM(s, rngs=nnx.Rngs(0)) for n, s in base.items()}
  small = lambda: TransformerLM(base['dense_small'], rngs=nnx.Rngs(0))
  models['pruned_50'] = pruned(small(), sparsity=0.5)
  models['pruned_2_4'] = pruned(small(), n_m=(2, 4))
  models['int8'] = Int8(small())
  return models


def loop_of(model, path=None) -> Loop:
  from flax import nnx
  if isinstance(model, Int8):
    return Loop(functools.partial(dequantised_model, model), model.quantised, path)
  graphdef, state = nnx.split(model)
  return Loop(functools.partial(nnx.merge, graphdef), state, path)


def measure(size: dict, models: dict, base: dict) -> list[dict]:
  """Every model at every batch through the same Loop, interleaved."""
  import jax
  import numpy as np
  from flax import nnx
  spec_of = dict(base, int8=base['dense_small'], pruned_50=base['dense_small'],
                 pruned_2_4=base['dense_small'])
  loops = {m: loop_of(models[m]) for m in MODELS}
  p, n = size['prompt'], size['new']
  rows = []
  for b in size['batches']:
    prompt = jax.numpy.asarray(np.random.default_rng(b).integers(0, 256, (b, p), np.int32))
    best = {m: [float('inf'), float('inf')] for m in MODELS}
    for m in MODELS:                                   # compile and warm up
      loops[m](prompt, n)
    for _ in range(size['repeats']):                   # interleaved: the same conditions
      for m in MODELS:
        pre, dec = loops[m](prompt, n)
        best[m] = [min(best[m][0], pre), min(best[m][1], dec)]
    for m in MODELS:
      s, int8 = spec_of[m], m == 'int8'
      params = [] if int8 else jax.tree.leaves(nnx.state(models[m], nnx.Param))
      rows.append(dict(
          model=m, batch=b, prefill_tokens_per_s=b * p / best[m][0],
          decode_ms_per_token=best[m][1] / (n - 1) * 1e3,
          decode_tokens_per_s=b * (n - 1) / best[m][1],
          param_bytes=models[m].resident_bytes() if int8 else sum(x.nbytes for x in params),
          zero_params=sum(int((x == 0).sum()) for x in params),
          kv_cache_bytes=kv_bytes(s, b, slots(p, n)),
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
  base = specs(size)
  models = build(base)
  rows = measure(size, models, base)
  paths = decode_paths(size, models, base)
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
  md += ('\n## The two MoE decode paths\n\nDecode time per token of the whole model with '
         "MoE.generate's path forced to `dispatch.chosen_experts` (gathers the T*K chosen "
         "experts' weights) or to the dropless layer (rows sorted by expert, a grouped matmul "
         'over all E), against the batch (T tokens per decode step), interleaved as above. '
         'MoE.generate takes the chosen path while 2*T*K < E (`moe.generate_path`).\n\n')
  md += common.table(['model', 'K', 'batch T', 'chosen ms/token', 'dropless ms/token',
                      'chosen / dropless', 'MoE.generate takes'],
                     [[r['model'], r['k'], r['batch'], f"{r['chosen_ms']:.2f}",
                       f"{r['dropless_ms']:.2f}", f"{r['chosen_over_dropless']:.2f}",
                       r['generate_takes']] for r in paths])
  print(md)
  if a.out:
    common.write_results('bench_decode', md, rows, meta | {'summary': summary,
                                                           'decode_paths': paths}, a.out)
    plot(rows, a.out / 'bench_decode.png')
  return rows, paths, summary


if __name__ == '__main__':
  main()
