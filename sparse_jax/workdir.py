"""A workdir's saved config: which changes a resume may make, and the config.py beside a
written model (sparse_jax.compress, sparse_jax.convert) that reads its config back."""
from __future__ import annotations

import pathlib

import ml_collections

from sparse_jax.config import ConfigError


# Keys of the model sections that choose how the same function is computed or trained,
# not which function it is, so a checkpoint may resume with other values.
RESUMABLE_KEYS = ('model.dtype', 'model.scan_layers', 'moe.expert_compute',
                  'moe.grouped_matmul', 'moe.block_size', 'moe.ep_transport',
                  'moe.load_balance_coef', 'moe.z_loss_coef', 'moe.bias_rate')


_CONFIG_PY = '''"""The config of the model in this directory (written by {writer})."""
import json
import pathlib

from sparse_jax.config import from_saved


def get_config():
  return from_saved(json.loads(pathlib.Path(__file__).with_name('config.json').read_text()))
'''


def write_workdir_config(directory: pathlib.Path, config: ml_collections.ConfigDict,
                         writer: str) -> None:
  """directory/config.json and directory/config.py, whose get_config() reads it back, so
  that `sparse_jax.train --config=DIR/config.py --workdir=DIR` continues the model there."""
  (directory / 'config.json').write_text(config.to_json())
  (directory / 'config.py').write_text(_CONFIG_PY.format(writer=writer))


def check_resume(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
                 where: str, step: int | None = None) -> dict:
  """Refuse to resume the checkpoint `where` (written with `saved`, at `step`) under
  `config` when the model differs (any model.* or moe.* key but RESUMABLE_KEYS), the
  pruning does (pruning.*: its state is part of the checkpoint) or the global batch does
  (except at step 0, before any data was read); mesh, FSDP, remat, micro-batches and
  device count may all change. Returns {key: (saved, new)} of the RESUMABLE_KEYS that
  changed, for the trainer to record."""
  def flat(c, prefix):
    for key, value in c.items():
      if isinstance(value, ml_collections.ConfigDict):
        yield from flat(value, f'{prefix}{key}.')
      else:
        yield f'{prefix}{key}', value

  old, new = dict(flat(saved, '')), dict(flat(config, ''))
  for key, value in new.items():
    section = key.split('.')[0]
    if section in ('model', 'moe', 'pruning') and key not in RESUMABLE_KEYS and old[key] != value:
      fix = ('use a new workdir, or set it back' if section != 'pruning' else
             'set it back, or prune the trained model into a new workdir with python -m '
             'sparse_jax.compress')
      raise ConfigError(f'{key}={value!r} differs from the checkpoint in {where}, which was '
                        f'written with {key}={old[key]!r}: a checkpoint only resumes the model '
                        f'and pruning it was written for; {fix}')
  for key in ('train.batch_size', 'train.seq_len') if step != 0 else ():
    if old[key] != new[key]:
      raise ConfigError(f'{key}={new[key]} differs from the checkpoint in {where} '
                        f'({old[key]}): resuming keeps the global batch so the data stream '
                        f'continues where it stopped; set {key}={old[key]}')
  return {k: (old[k], new[k]) for k in RESUMABLE_KEYS if old[k] != new[k]}
