"""Evaluate a workdir's model: loss and bits per byte (or per token) on a split or on files.

  python -m sparse_jax.evaluate --workdir=W [--split=validation --batches=N]
  python -m sparse_jax.evaluate --workdir=W --data='files:notes/*.txt' [--split=all]

The model is the workdir's newest verified checkpoint (sparse_jax.train, compress or
convert --from_hf), on every device here; no optimizer is built and the workdir is only
read. The text is the run's data source (data.source, tokenised as it trained: bytes or
data.tokenizer) unless --data names another source; a files source is read whole
(--split=all) unless --split says otherwise. --batches counts batches of the run's
train.batch_size x train.seq_len tokens, in order (default the run's train.eval_batches,
what training reported; 0: the whole split). Prints one JSON object: loss in nats per
token, bpb (bits per byte) for byte tokens or bits_per_token for a tokenizer, the routing
metrics of MoE models, and what was read. Bad input exits 2 with one line, before
anything compiles.
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import sys

from absl import flags

from sparse_jax import cli

FLAGS = flags.FlagValues()
_DEFINE = dict(flag_values=FLAGS)
flags.DEFINE_string('workdir', None, 'The workdir whose model is evaluated.', **_DEFINE)
flags.DEFINE_string('data', None, "A data source ('stdlib', 'tfds:NAME', 'files:GLOB[,GLOB]'); "
                    "default: the run's data.source.", **_DEFINE)
flags.DEFINE_string('split', None, "'validation' or 'train' ('all' for files; default: "
                    "'all' for a --data files source, else 'validation').", **_DEFINE)
flags.DEFINE_integer('batches', None, "Batches to read (default: the run's "
                     'train.eval_batches; 0: the whole split).', lower_bound=0, **_DEFINE)
flags.DEFINE_integer('batch_size', None, "Sequences per batch (default: the run's).",
                     lower_bound=1, **_DEFINE)
flags.DEFINE_integer('seq_len', None, "Tokens per sequence (default: the run's).",
                     lower_bound=1, **_DEFINE)
flags.DEFINE_integer('cpu_devices', None, 'Simulate this many CPU devices (CPU only).',
                     lower_bound=1, **_DEFINE)


def main(argv=None):
  argv = sys.argv if argv is None else argv
  FLAGS.unparse_flags()               # each call starts from the defaults (tests call main)
  try:
    FLAGS(argv)
    if not FLAGS.workdir:
      raise ValueError('--workdir is required')
  except (flags.Error, ValueError) as e:
    cli.die(e)
  cli.setup(FLAGS.cpu_devices)
  from sparse_jax import data, sharding
  from sparse_jax.training import checkpoint, loop
  try:
    source = FLAGS.data
    split = FLAGS.split or ('all' if source and data.sources.parse(source).kind == 'files'
                            else 'validation')
    _, spec, model = checkpoint.load_model(pathlib.Path(FLAGS.workdir))
    t = spec.train
    t = dataclasses.replace(t, batch_size=FLAGS.batch_size or t.batch_size,
                            seq_len=FLAGS.seq_len or t.seq_len)
    spec = dataclasses.replace(spec, train=t, data_source=source or spec.data_source)
    mesh = loop.make_mesh(spec)                 # the mesh load_model placed the model on
    shards = math.prod(mesh.shape[a] for a in sharding.token_axes(mesh))
    if t.batch_size % shards:
      raise ValueError(f'--batch_size={t.batch_size} does not split over the {shards} '
                       f'devices that hold the batch here; give a multiple of {shards}')
    loop.check_vocab(spec)
    data.prepare(spec.data_source, spec.data_dir, verbose=False)
    out = loop.evaluate(spec, model, mesh, split, FLAGS.batches)
  except (ValueError, OSError) as e:     # DataError, NoCheckpointError, SpecError, ...
    cli.die(e)
  if spec.data_tokenizer is not None:
    out['bits_per_token'] = out['loss'] / math.log(2)
  out.update(workdir=str(FLAGS.workdir), data=spec.data_source, split=split,
             tokens=out['batches'] * t.batch_size * t.seq_len)
  print(json.dumps(out))


if __name__ == '__main__':
  main()
