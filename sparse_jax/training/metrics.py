"""A run's metrics: DIR/metrics.jsonl and TensorBoard events in DIR/tb, written by process 0.

Both are written synchronously in the caller's thread, so a failed write (a full disk,
a lost mount) raises WriteError at the step that made it, naming the file and the cause;
nothing waits on a writer thread that has died (tensorboardX 2.6's SummaryWriter queues
events for a thread that exits on an OSError, after which `add_scalar` blocks forever).

On resume, rows past the checkpoint (made by the run that stopped after it, and made
again now) and a last row cut off by a kill are moved, never deleted, to
DIR/metrics.superseded.jsonl.
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import socket
import struct
import sys
import time

import jax

SUPERSEDED = 'metrics.superseded.jsonl'


class WriteError(OSError):
  """Writing a metrics row or an event failed; the message names the file and the cause."""


def _is_json(line: str) -> bool:
  try:
    json.loads(line)
    return True
  except json.JSONDecodeError:
    return False


@contextlib.contextmanager
def _writing(path):
  """OSError -> WriteError naming the path and the cause."""
  try:
    yield
  except WriteError:
    raise
  except OSError as e:
    raise WriteError(f'writing {path} failed: {e.strerror or e}') from e


class _Events:
  """TensorBoard's event file format (records of a serialised Event proto, each framed by
  its length and masked CRC32C), written with a flush per call."""

  def __init__(self, logdir: pathlib.Path):
    from tensorboardX.proto import event_pb2
    from tensorboardX.record_writer import masked_crc32c
    from tensorboardX.summary import scalar
    self._event, self._crc, self._scalar = event_pb2.Event, masked_crc32c, scalar
    logdir.mkdir(parents=True, exist_ok=True)
    self.path = logdir / f'events.out.tfevents.{time.time():.0f}.{socket.gethostname()}'
    self._file = open(self.path, 'ab')  # pylint: disable=consider-using-with
    self._write([self._event(wall_time=time.time(), file_version='brain.Event:2')])

  def scalars(self, step: int, values: dict[str, float]):
    now = time.time()
    self._write([self._event(wall_time=now, step=step, summary=self._scalar(tag, v))
                 for tag, v in values.items()])

  def _write(self, events):
    for e in events:
      data = e.SerializeToString()
      header = struct.pack('Q', len(data))
      self._file.write(header + struct.pack('I', self._crc(header)) + data +
                       struct.pack('I', self._crc(data)))
    self._file.flush()

  def close(self):
    self._file.close()


class MetricsWriter:
  """metrics.jsonl and TensorBoard events. resume_step: the checkpoint's step, or None for
  a run that starts at step 0 (then every existing row is superseded)."""

  def __init__(self, workdir: pathlib.Path, resume_step: int | None):
    self.active = jax.process_index() == 0
    self.path = workdir / 'metrics.jsonl'
    self.tb = None
    if not self.active:
      return
    with _writing(self.path):
      self._supersede(workdir, resume_step or 0)
      self.path.touch()
    with _writing(workdir / 'tb'):
      self.tb = _Events(workdir / 'tb')

  def _supersede(self, workdir: pathlib.Path, resume_step: int):
    if not self.path.exists():
      return
    lines = [r for r in self.path.read_text().splitlines() if r]
    if lines and not _is_json(lines[-1]):
      print(f'note: a cut-off last line of {self.path} (a kill mid-write) moved to '
            f'{SUPERSEDED}', file=sys.stderr)
    kept = [_is_json(r) and json.loads(r)['step'] <= resume_step for r in lines]
    keep = [r for r, k in zip(lines, kept) if k]
    moved = [r for r, k in zip(lines, kept) if not k]
    if not moved:
      return
    with (workdir / SUPERSEDED).open('a') as f:
      f.write(''.join(r + '\n' for r in moved))
    tmp = self.path.with_name(self.path.name + '.tmp')
    tmp.write_text(''.join(r + '\n' for r in keep))
    os.replace(tmp, self.path)
    print(f'note: {len(moved)} row(s) of {self.path.name} past step {resume_step} (made by '
          f'the run that stopped after that checkpoint) moved to {SUPERSEDED}',
          file=sys.stderr)

  def write(self, row: dict):
    if not self.active:
      return
    with _writing(self.path), self.path.open('a') as f:
      f.write(json.dumps(row) + '\n')
    tag = row.get('split', 'train')
    with _writing(self.tb.path):
      self.tb.scalars(row['step'], {f'{tag}/{k}': v for k, v in row.items()
                                    if k not in ('step', 'split') and isinstance(v, (int, float))})

  def close(self):
    if self.tb is not None:
      try:
        self.tb.close()
      except OSError:       # its failure was already reported by the write that hit it
        pass
