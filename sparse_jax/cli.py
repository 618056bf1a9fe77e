"""What the command lines share: one-line errors, and the process setup after the flags."""
from __future__ import annotations

import sys

from absl import logging


def die(message, code: int = 2):
  """The message on one stderr line, then exit `code` (2: bad input)."""
  print(f'error: {" ".join(str(message).split())}', file=sys.stderr)
  sys.exit(code)


def setup(cpu_devices: int | None = None) -> None:
  """After parsing flags, before any JAX computation: errors only from absl (tfds' info
  chatter), no orbax thread tracebacks (the commands report a failure in one line), and
  `cpu_devices` simulated CPU devices if given."""
  logging.set_verbosity(logging.ERROR)
  logging.get_absl_handler().addFilter(lambda r: '/orbax/' not in r.pathname)
  if cpu_devices:
    import jax
    jax.config.update('jax_num_cpu_devices', cpu_devices)
