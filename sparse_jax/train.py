"""Train a dense or MoE language model from the command line.

  python -m sparse_jax.train --config=configs/switch.py --workdir=runs/switch \
      [--config.train.steps=500 ...] [--cpu_devices=8]

Writes DIR/metrics.jsonl (train rows: step, loss, ...; eval rows: step, split, loss, bpb),
TensorBoard events in DIR/tb and orbax checkpoints in DIR/checkpoints (model, optimizer,
step, data-iterator position, config). Rerunning the same command resumes from the
latest checkpoint and reproduces the uninterrupted run. A bad config or flag exits with
status 2 and one line on stderr.
"""
from __future__ import annotations

import pathlib
import sys

from absl import flags
from ml_collections import config_flags

from sparse_jax import cli

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).')
flags.DEFINE_string('workdir', None, 'Directory for metrics, TensorBoard and checkpoints.')
flags.DEFINE_integer('cpu_devices', None, 'Simulate this many CPU devices (CPU only).',
                     lower_bound=1)
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (multi-host).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-host).')
flags.DEFINE_integer('process_id', None, 'Index of this process (multi-host).')
flags.DEFINE_bool('multihost', False, 'Call jax.distributed.initialize() even without the '
                  'three flags above (their values are auto-detected on TPU/GPU clusters).')


def main(argv=None):
  argv = sys.argv if argv is None else argv
  try:
    FLAGS(argv)
    config = _CONFIG.value
    if config is not None:
      config = config.copy_and_resolve_references()      # loads the file now, not later
  except flags.Error as e:                               # flag syntax and values
    cli.die(e)
  except (KeyError, AttributeError) as e:                # an override of a missing key
    while e.args and isinstance(e.args[0], BaseException):   # AttributeError(KeyError(..))
      e = e.args[0]
    text = str(e.args[0]) if e.args else str(e)
    first, _, hint = text.partition('\n')              # ml_collections adds "Did you mean"
    key = first.strip('\'" ')
    flag = next((a.split('=')[0] for a in argv if a.startswith('--config.')
                 and f'.{key}.' in a.split('=')[0] + '.'), key)
    hint = f' ({hint.strip()})' if hint.strip() else ''
    cli.die(f'unknown config key {key!r} in {flag}{hint}; the keys and their defaults are '
            'in sparse_jax/config.py (base_config)')
  except OSError as e:                                   # the config file itself
    cli.die('cannot load the --config file: ' + str(e).splitlines()[-1].strip())
  if config is None:
    cli.die('--config is required, e.g. --config=configs/switch.py')
  if not FLAGS.workdir:
    cli.die('--workdir is required, e.g. --workdir=runs/switch')

  cli.setup(FLAGS.cpu_devices)
  import jax
  if FLAGS.multihost or FLAGS.coordinator_address or FLAGS.num_processes:
    from sparse_jax.sharding import initialize_distributed
    initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)

  from sparse_jax.config import ConfigError, validate
  try:
    validate(config, jax.device_count(), jax.process_count())
  except ConfigError as e:
    cli.die(e)
  from sparse_jax.training import checkpoint, loop
  try:
    code = loop.train(config, pathlib.Path(FLAGS.workdir))
  except (ConfigError, loop.DataError, loop.WorkdirError,
          checkpoint.NoCheckpointError) as e:
    cli.die(e)                  # ConfigError here: FSDP cannot split, or resume refused
  sys.exit(code)


if __name__ == '__main__':
  main()
