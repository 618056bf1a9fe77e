"""Activation sparsity of ReLU vs GELU FFNs (the "lazy neuron" effect, Li et al. 2022).

  python experiments/repro_activation_sparsity.py --preset=quick   # ~3 min on 2 CPU cores

Two dense models that differ only in the FFN activation, trained identically; the FFN
hidden units are probed on validation tokens before and after training
(sparse_jax.analysis.activations.activation_sparsity). ReLU units are inactive when exactly 0; GELU
units, which are never 0, when |h| < 1e-2. Paper [V-abstract]: after training only 3.0%
(T5-Base) and 6.3% (ViT-B/16) of post-ReLU MLP activations are non-zero; larger models
are sparser.
"""
from __future__ import annotations

import numpy as np
from flax import nnx

from sparse_jax.analysis.activations import activation_sparsity
from sparse_jax.config import model_spec
from sparse_jax.models import TransformerLM

import common

ACTIVATIONS = ('relu', 'gelu')


def probe(model, tokens) -> dict:
  """Means over the FFN blocks: active fraction, dead-neuron fraction, and the share of
  units active at least once in a window of 64 tokens."""
  stats = activation_sparsity(model, tokens, windows=(64,)).values()
  return dict(active_fraction=float(np.mean([1 - s['zero_fraction'] for s in stats])),
              dead_fraction=float(np.mean([s['dead_fraction'] for s in stats])),
              window64_active=float(np.mean([s['window_active_fraction'][64]
                                             for s in stats])))


def main(argv=None):
  common.setup_devices(8)
  a = common.study_args(__doc__, argv)
  base = common.sized(a.preset)
  cfgs = {act: common.override(base, model=dict(activation=act)) for act in ACTIVATIONS}
  meta = common.provenance([base.seed])
  res = common.run_study('repro', a.preset, cfgs, a.runs)
  tokens = common.validation_tokens(res['relu']['spec'])
  rows = []
  for act, r in res.items():
    init = TransformerLM(model_spec(cfgs[act]), rngs=nnx.Rngs(base.seed))
    _, trained, _ = common.load(r)
    for when, model in (('init', init), ('trained', trained)):
      rows.append(dict(activation=act, when=when, val_loss=r['val_loss'] if when == 'trained'
                       else None, **probe(model, tokens)))
  body = (common.describe(base) + f" (dense), d_ff {base.model.d_ff}; probed on "
          f'{tokens.shape[0]}x{tokens.shape[1]} validation tokens.\n\n')
  body += common.table(
      ['activation', 'when', 'active units / token', 'dead units', 'active in 64 tokens',
       'val loss'],
      [[r['activation'], r['when'], f"{r['active_fraction']:.1%}", f"{r['dead_fraction']:.1%}",
        f"{r['window64_active']:.1%}", f"{r['val_loss']:.4f}" if r['val_loss'] else '–']
       for r in rows])
  by = {(r['activation'], r['when']): r for r in rows}
  relu, relu0, gelu = by[('relu', 'trained')], by[('relu', 'init')], by[('gelu', 'trained')]
  verdicts = [
      ('Training makes ReLU activations sparser than at init',
       relu['active_fraction'] < relu0['active_fraction'],
       f"{relu0['active_fraction']:.1%} -> {relu['active_fraction']:.1%} active"),
      ('Trained ReLU FFNs are very sparse (paper: 3.0% active in T5-Base)',
       relu['active_fraction'] < 0.1, f"{relu['active_fraction']:.1%} active"),
      ('GELU gives ReLU-like sparsity only at a threshold (|h| < 1e-2): fewer units are '
       'inactive', gelu['active_fraction'] > relu['active_fraction'],
       f"GELU {gelu['active_fraction']:.1%} vs ReLU {relu['active_fraction']:.1%} active")]
  common.report('activation_sparsity', a, 'Activation sparsity: ReLU vs GELU', meta, rows,
                body, verdicts)


if __name__ == '__main__':
  main()
