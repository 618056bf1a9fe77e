"""Hugging Face folders in and out of sparse_jax workdirs.

  python -m sparse_jax.convert --from_hf=DIR --workdir=W [--cpu_devices=N] \\
      [--config.mesh.expert=4 --config.train.seq_len=512 ...]
  python -m sparse_jax.convert --to_hf=DIR --workdir=W

--from_hf reads a Hugging Face model folder (or a repository id already in the local
Hugging Face cache) and writes the new workdir W: a verified checkpoint at step 0 (the
model, a fresh optimizer state, the data at its start), W/config.json and W/config.py
(the imported model's config with the --config overrides), W/hf/ (the source's
config.json and tokenizer files, which --to_hf writes back) and W/tokenizer.json when
the folder has one. Then

  python -m sparse_jax.train --config=W/config.py --workdir=W --config.train.steps=N
  python -m sparse_jax.compress --workdir=W --out=W2 --method=wanda --sparsity=0.5

fine-tune and compress it. --to_hf writes the newest verified checkpoint of a workdir
(one from --from_hf, trained or compressed further) as a folder transformers'
from_pretrained reads. A bad folder, flag or config exits 2 with one line, before
anything is written; W appears whole or not at all.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import sys

from absl import flags
from ml_collections import config_flags

from sparse_jax import cli
from sparse_jax.config import ConfigError, base_config
from sparse_jax.workdir import write_workdir_config

FLAGS = flags.FlagValues()
_DEFINE = dict(flag_values=FLAGS)
flags.DEFINE_string('from_hf', None, 'A Hugging Face model folder (or a cached repo id) to '
                    'import into --workdir.', **_DEFINE)
flags.DEFINE_string('to_hf', None, 'A new folder to export the newest checkpoint of '
                    '--workdir into.', **_DEFINE)
flags.DEFINE_string('workdir', None, 'The sparse_jax workdir written (--from_hf) or read '
                    '(--to_hf).', **_DEFINE)
flags.DEFINE_integer('cpu_devices', None, 'Simulate this many CPU devices (CPU only).',
                     lower_bound=1, **_DEFINE)
# Overrides of the imported config (mesh.*, train.*, data.*): parsed against the defaults,
# then applied to the imported model's config key by key.
_CONFIG = config_flags.DEFINE_config_dict('config', base_config(), flag_values=FLAGS)


class FlagError(ConfigError):
  """A bad flag or combination of flags; one line."""


# The model.* and moe.* keys that say how an imported model runs or trains, not what it is.
RUN_KEYS = ('model.dtype', 'model.param_dtype', 'moe.load_balance_coef', 'moe.z_loss_coef',
            'moe.group_size', 'moe.expert_compute', 'moe.grouped_matmul', 'moe.block_size',
            'moe.ep_transport', 'moe.router_jitter', 'moe.balancing', 'moe.bias_rate')


def _overrides(argv, parsed) -> dict:
  """{dotted key: value} of the --config.KEY=VALUE flags, parsed by ml_collections."""
  out = {}
  for a in argv:
    if a.startswith('--config.'):
      key = a[len('--config.'):].split('=')[0]
      group, name = key.split('.', 1)
      out[key] = parsed[group][name]
  return out


def from_hf(source: str, workdir: str, overrides: dict | None = None) -> pathlib.Path:
  """Imports `source` into the new workdir (see the module docstring); returns it."""
  import jax
  from sparse_jax import hub
  from sparse_jax.config import resolve
  from sparse_jax.hub.loading import build, folder_of, plan
  from sparse_jax.hub.saving import TOKENIZER_FILES
  from sparse_jax.training import checkpoint, loop
  from sparse_jax.training.steps import build as build_steps

  out = pathlib.Path(workdir)
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise FlagError(f'--workdir={workdir} already exists and is not empty; give a new one')
  folder = folder_of(source)
  config = hub.import_config(folder)
  for key, value in (overrides or {}).items():
    group, name = key.split('.')
    if group in ('model', 'moe') and key not in RUN_KEYS and config[group][name] != value:
      raise FlagError(f'--config.{key}: the imported model determines {key} (it is '
                      f'{config[group][name]!r}); only how it runs and trains may be changed')
    config[group][name] = value
  spec = resolve(config, jax.device_count(), jax.process_count())
  if (folder / 'tokenizer.json').exists() and 'data.tokenizer' not in (overrides or {}):
    config.data.tokenizer = str((out / 'tokenizer.json').resolve())   # its own token ids
    config.data.eod_id = _eos(folder)
  p = plan(folder, spec.model)                     # every check on the files, first
  mesh = loop.make_mesh(spec)
  model = build(spec.model, p, mesh, fsdp=spec.fsdp)
  steps = build_steps(spec, mesh, model)
  work = out.with_name(f'.{out.name}.incomplete')
  shutil.rmtree(work, ignore_errors=True)
  work.mkdir(parents=True)
  ckpt = checkpoint.Checkpoints(work, keep=spec.train.keep_checkpoints)
  ckpt.save(0, steps.state, None, config, wait=True)
  ckpt.close()
  write_workdir_config(work, config, 'sparse_jax.convert')
  if (folder / 'tokenizer.json').exists():
    shutil.copy2(folder / 'tokenizer.json', work / 'tokenizer.json')
  (work / 'hf').mkdir()
  for name in ('config.json',) + TOKENIZER_FILES:
    if (folder / name).exists():
      shutil.copy2(folder / name, work / 'hf' / name)
  (work / 'convert.json').write_text(json.dumps(
      {'from_hf': str(folder), 'architecture': spec.model.architecture}, indent=1))
  if out.exists():
    out.rmdir()
  os.rename(work, out)
  return out


def _eos(folder: pathlib.Path) -> int:
  """The model's end-of-text id: config.json's eos_token_id (the first of a list), else
  tokenizer_config.json's eos_token looked up in tokenizer.json, else 0."""
  eos = json.loads((folder / 'config.json').read_text()).get('eos_token_id')
  eos = eos[0] if isinstance(eos, list) and eos else eos
  if isinstance(eos, int):
    return eos
  tc = folder / 'tokenizer_config.json'
  name = json.loads(tc.read_text()).get('eos_token') if tc.exists() else None
  name = name.get('content') if isinstance(name, dict) else name
  if isinstance(name, str):
    from tokenizers import Tokenizer
    eos = Tokenizer.from_file(str(folder / 'tokenizer.json')).token_to_id(name)
  return eos if isinstance(eos, int) else 0


def to_hf(workdir: str, path: str) -> pathlib.Path:
  """Exports the newest verified checkpoint of `workdir` into the new folder `path`."""
  from sparse_jax import hub
  from sparse_jax.training import checkpoint

  w = pathlib.Path(workdir)
  out = pathlib.Path(path)
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise FlagError(f'--to_hf={path} already exists and is not empty; give a new folder')
  if not (w / 'checkpoints').is_dir():
    raise checkpoint.NoCheckpointError(f'--workdir={workdir} has no checkpoints/ to export')
  _, spec, model = checkpoint.load_model(w)        # on the devices here, whatever it trained on
  return hub.save_hf(model, spec.model, out, source=w / 'hf' if (w / 'hf').is_dir() else None)


def main(argv=None):
  argv = sys.argv if argv is None else argv
  try:
    FLAGS(argv)
    if bool(FLAGS.from_hf) == bool(FLAGS.to_hf):
      raise FlagError('give exactly one of --from_hf=DIR (import) and --to_hf=DIR (export)')
    if not FLAGS.workdir:
      raise FlagError('--workdir is required')
    overrides = _overrides(argv, _CONFIG.value)
    if FLAGS.to_hf and overrides:
      raise FlagError('--config overrides apply to --from_hf only')
  except (flags.Error, FlagError, KeyError, AttributeError) as e:
    cli.die(e)
  cli.setup(FLAGS.cpu_devices)
  from sparse_jax.hub import HubError
  from sparse_jax.training.checkpoint import NoCheckpointError
  try:
    if FLAGS.from_hf:
      out = from_hf(FLAGS.from_hf, FLAGS.workdir, overrides)
      print(f'wrote {out} (step 0); fine-tune it with\n  python -m sparse_jax.train '
            f'--config={out / "config.py"} --workdir={out} --config.train.steps=N')
    else:
      out = to_hf(FLAGS.workdir, FLAGS.to_hf)
      print(f'wrote {out}')
  except (FlagError, ConfigError, HubError, NoCheckpointError) as e:
    cli.die(e)


if __name__ == '__main__':
  main()
