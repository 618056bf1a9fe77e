"""What the command lines share: one-line errors, and the process setup after the flags."""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

from absl import logging


def die(message, code: int = 2):
  """The message on one stderr line, then exit `code` (2: bad input)."""
  print(f'error: {" ".join(str(message).split())}', file=sys.stderr)
  sys.exit(code)


def setup(cpu_devices: int | None = None) -> None:
  """After parsing flags, before any JAX computation: errors only from absl (tfds' info
  chatter), no orbax thread tracebacks (the commands report a failure in one line), and
  `cpu_devices` simulated CPU devices if given, freed memory kept (keep_freed_memory)."""
  keep_freed_memory()
  logging.set_verbosity(logging.ERROR)
  logging.get_absl_handler().addFilter(lambda r: '/orbax/' not in r.pathname)
  if cpu_devices:
    import jax
    jax.config.update('jax_num_cpu_devices', cpu_devices)


def keep_freed_memory() -> bool:
  """Make glibc's malloc keep freed memory in the process: one arena, no chunks of their
  own mapping, no trimming. XLA allocates each step's large buffers anew, and with glibc's
  defaults each one is a fresh mapping whose pages fault in, zeroed, on first touch, every
  step (docs/benchmarks.md#host-memory-and-page-faults measures the cost on XLA:CPU).
  Costs: the resident size never shrinks below its peak.

  Call it before JAX starts its threads (a thread keeps the arena it first allocated from).
  Returns whether it applied: not without glibc, nor with SPARSE_JAX_KEEP_FREED_MEMORY=0.
  """
  if os.environ.get('SPARSE_JAX_KEEP_FREED_MEMORY', '1') == '0':
    return False
  try:
    mallopt = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6').mallopt
  except (OSError, AttributeError):
    return False
  m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8             # glibc's malloc.h
  return all(mallopt(option, value) == 1 for option, value in (
      (m_arena_max, 1), (m_mmap_max, 0), (m_trim_threshold, 2**31 - 1)))
