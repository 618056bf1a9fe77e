"""Imported checkpoints against transformers: the max |logit difference| per family, on
one device and on a data 2 x expert 4 mesh, for the reference folders of tests/hf (tiny
random-weight models that transformers built and saved, with its float32 logits on two
256-token rows; tests/hf/make_fixtures.py says which transformers version).

  python experiments/hub_reference.py --out experiments/results
"""
from __future__ import annotations

import argparse
import json
import pathlib

import common

HF = common.ROOT / 'tests' / 'hf'


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--out', type=pathlib.Path, default=None,
                  help='write hub_reference.{md,csv,json} here')
  a = ap.parse_args(argv)
  common.setup_devices(8)
  import jax
  import numpy as np
  from sparse_jax import hub, sharding
  meta = common.provenance([0], source=None)
  mesh = sharding.make_mesh(2, 4)
  rows = []
  for folder in sorted(p for p in HF.iterdir() if (p / 'reference.npz').exists()):
    ref = np.load(folder / 'reference.npz')
    versions = json.loads((folder / 'reference.json').read_text())
    model, spec = hub.load_hf(folder)
    one = np.asarray(model(ref['tokens'])[0])
    model, _ = hub.load_hf(folder, mesh=mesh)
    with jax.set_mesh(mesh):
      many = np.asarray(jax.jit(lambda m, t: m(t)[0])(model, np.tile(ref['tokens'], (4, 1))))
    scale = float(np.abs(ref['logits']).max())
    rows.append(dict(folder=folder.name, architecture=spec.architecture,
                     experts=spec.moe.num_experts if spec.moe else 0,
                     tokens=list(ref['tokens'].shape), max_abs_logit=scale,
                     one_device=float(np.abs(one - ref['logits']).max()),
                     mesh_2x4=float(np.abs(many - np.tile(ref['logits'], (4, 1, 1))).max()),
                     transformers=versions.get('transformers_version')))
  md = common.header('Imported checkpoints against transformers', meta)
  md += ('Max |logit difference| from transformers\' own float32 logits on 2 x 256 tokens '
         '(tests/hf/*/reference.npz); the mesh run tiles the rows 4 times over data 2 x '
         'expert 4 (experts split over the expert axis).\n\n')
  md += common.table(
      ['folder', 'architecture', 'experts', 'max |logit|', 'one device', 'mesh 2 x 4',
       'transformers'],
      [[r['folder'], r['architecture'], r['experts'], f"{r['max_abs_logit']:.2f}",
        f"{r['one_device']:.1e}", f"{r['mesh_2x4']:.1e}", r['transformers']] for r in rows])
  print(md)
  if a.out:
    common.write_results('hub_reference', md, rows, meta, a.out)


if __name__ == '__main__':
  main()
