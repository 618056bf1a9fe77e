"""bfloat16 vs float32 compute: how far the loss trace of the same run moves.

  python experiments/bench_bf16.py --json experiments/results/bench_bf16.json

Trains configs/tiny.py (8 simulated CPU devices, the embedded corpus) twice from the same
seed, with model.dtype float32 and bfloat16 (parameters and optimizer float32 in both),
and reports the relative difference of the training loss per step and of the final
validation loss.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import tempfile

import numpy as np

from sparse_jax.config import load_config
from sparse_jax.training import loop

import common


def main(argv=None):
  common.setup_devices(8)
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--steps', type=int, default=40)
  ap.add_argument('--json', metavar='PATH')
  a = ap.parse_args(argv)
  c = load_config(common.ROOT / 'configs' / 'tiny.py')
  c.train.update(steps=a.steps, eval_every=a.steps, checkpoint_every=a.steps)
  meta = common.provenance([c.seed])
  train, val = {}, {}
  with tempfile.TemporaryDirectory() as tmp:
    for dtype in ('float32', 'bfloat16'):
      run = common.override(c, model=dict(dtype=dtype))
      workdir = pathlib.Path(tmp) / dtype
      if loop.train(run, workdir) != 0:
        raise SystemExit(f'the {dtype} run failed')
      rows = [json.loads(r) for r in (workdir / 'metrics.jsonl').read_text().splitlines()]
      train[dtype] = np.array([r['loss'] for r in rows if 'split' not in r])
      val[dtype] = [r['loss'] for r in rows if 'split' in r][-1]
  rel = np.abs(train['bfloat16'] - train['float32']) / train['float32']
  out = dict(steps=a.steps, max_rel_train_loss=float(rel.max()),
             mean_rel_train_loss=float(rel.mean()), val_loss=val,
             rel_val_loss=abs(val['bfloat16'] - val['float32']) / val['float32'])
  print(common.header('bfloat16 vs float32 compute, configs/tiny.py', meta) +
        f"{a.steps} steps: training loss per step differs by at most "
        f"{out['max_rel_train_loss']:.2e} (mean {out['mean_rel_train_loss']:.2e}) relative; "
        f"validation loss {val['float32']:.4f} (float32) vs {val['bfloat16']:.4f} (bfloat16).")
  if a.json:
    common.write_json(a.json, meta, **out)


if __name__ == '__main__':
  main()
