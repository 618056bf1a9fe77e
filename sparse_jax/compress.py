"""Compress a trained model: one-shot pruning or expert pruning, into a new workdir.

  python -m sparse_jax.compress --workdir=SRC --out=DST --method=wanda --sparsity=0.5
  python -m sparse_jax.compress --workdir=SRC --out=DST --method=sparsegpt --n_m=2:4
  python -m sparse_jax.compress --workdir=SRC --out=DST --method=experts --keep=6 \\
      --score=reap [--merge]

Reads SRC's newest good checkpoint (SRC is never written), prunes with
--calibration_batches batches of the training split as calibration data, prints the
validation loss before and after, and writes DST: a checkpoint at SRC's step (model,
optimizer state, data position) with the config of the compressed model, and
DST/config.py, so that

  python -m sparse_jax.train --config=DST/config.py --workdir=DST --config.train.steps=N

evaluates and continues training it (a recovery fine-tune). One-shot methods
(sparse_jax.pruning.post_training) keep their masks through that training (a one-shot
pruner whose step has passed); --method=experts keeps the `keep` best experts of every
MoE block (sparse_jax.pruning.experts) and compacts them, router columns and optimizer
state included (compaction.compact_experts). A bad flag exits 2 with one line.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import shutil
import sys
from typing import NamedTuple

import jax                     # imported, not started: --cpu_devices is applied in main()
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from sparse_jax import cli, data, pruning, roles
from sparse_jax.config import ConfigError, parse_n_m, resolve, validate
from sparse_jax.models import layout
from sparse_jax.pruning import compaction, experts, post_training
from sparse_jax.training import checkpoint, loop
from sparse_jax.training.steps import build
from sparse_jax.workdir import write_workdir_config

FLAGS = flags.FlagValues()       # its own: importing this next to sparse_jax.train is fine
ONE_SHOT, SCORES = post_training.METHODS, experts.SCORES
_DEFINE = dict(flag_values=FLAGS)
flags.DEFINE_string('workdir', None, 'The trained run to read (never modified).', **_DEFINE)
flags.DEFINE_string('out', None, 'A new directory for the compressed model.', **_DEFINE)
flags.DEFINE_string('method', None, f'One of {ONE_SHOT + ("experts",)}.', **_DEFINE)
flags.DEFINE_float('sparsity', None, 'One-shot: zeros per kernel, in [0, 1).', **_DEFINE)
flags.DEFINE_string('n_m', None, "One-shot: 'N:M' along the inputs, e.g. 2:4.", **_DEFINE)
flags.DEFINE_string('targets', 'all', "One-shot: 'all', 'ffn' or 'attn' kernels.", **_DEFINE)
flags.DEFINE_integer('block_size', 128, 'SparseGPT: columns per block.', lower_bound=1,
                     **_DEFINE)
flags.DEFINE_float('damp', 0.01, 'SparseGPT: dampening, a fraction of mean(diag H).',
                   **_DEFINE)
flags.DEFINE_integer('keep', None, 'Experts: experts kept in every MoE block.', **_DEFINE)
flags.DEFINE_string('score', 'frequency', f'Experts: one of {SCORES}.', **_DEFINE)
flags.DEFINE_bool('merge', False, 'Experts: merge each removed expert into its most similar '
                  'kept one instead of dropping it.', **_DEFINE)
flags.DEFINE_integer('calibration_batches', 4, 'Training batches of calibration data.',
                     **_DEFINE)
flags.DEFINE_integer('cpu_devices', None, 'Simulate this many CPU devices (CPU only).',
                     lower_bound=1, **_DEFINE)


class FlagError(ConfigError):
  """A bad flag or combination of flags; one line (a ConfigError, so that it also passes
  through Checkpoints.newest)."""


class Options(NamedTuple):
  """What compress() does; the command's flags, one for one."""
  workdir: str
  out: str
  method: str
  sparsity: float | None = None
  n_m: str | None = None
  targets: str = 'all'
  block_size: int = 128
  damp: float = 0.01
  keep: int | None = None
  score: str = 'frequency'
  merge: bool = False
  calibration_batches: int = 4


def check_options(f: Options) -> tuple[int, int] | None:
  """Checks the options that need no JAX (FlagError, one line); returns the parsed n_m."""
  if f.method not in ONE_SHOT + ('experts',):
    raise FlagError(f'--method={f.method!r} is unknown; use one of {ONE_SHOT + ("experts",)}')
  if f.score not in SCORES or f.targets not in ('all', 'ffn', 'attn'):
    raise FlagError(f'--score={f.score!r} / --targets={f.targets!r}: use one of {SCORES} / '
                    "('all', 'ffn', 'attn')")
  if not f.workdir or not f.out or not f.method:
    raise FlagError('--workdir, --out and --method are required, e.g. --workdir=runs/dense '
                    '--out=runs/dense_wanda50 --method=wanda --sparsity=0.5')
  src, dst = pathlib.Path(f.workdir).resolve(), pathlib.Path(f.out).resolve()
  if src == dst or src in dst.parents:
    raise FlagError(f'--out={f.out} must lie outside --workdir={f.workdir} (the source is '
                    'never written)')
  if dst.exists() and not dst.is_dir():
    raise FlagError(f'--out={f.out} is a file; give a new directory')
  if dst.exists() and any(dst.iterdir()):
    raise FlagError(f'--out={f.out} already holds files; give a new directory')
  if f.calibration_batches < 1:
    raise FlagError(f'--calibration_batches={f.calibration_batches} must be >= 1')
  n_m = None
  if f.method == 'experts':
    if f.keep is None or f.sparsity is not None or f.n_m:
      raise FlagError('--method=experts takes --keep=N (and --score, --merge), not '
                      '--sparsity or --n_m')
    return None
  if f.keep is not None:
    raise FlagError(f'--keep is for --method=experts; --method={f.method} takes --sparsity '
                    'or --n_m')
  if (f.sparsity is None) == (not f.n_m):
    raise FlagError(f'--method={f.method} needs exactly one of --sparsity=S and --n_m=N:M')
  if f.sparsity is not None and not 0 <= f.sparsity < 1:
    raise FlagError(f'--sparsity={f.sparsity} must be in [0, 1)')
  if f.n_m:
    try:
      n_m = parse_n_m(f.n_m)
    except ValueError:
      raise FlagError(f"--n_m={f.n_m!r} must look like 'N:M', e.g. 2:4") from None
    if not 0 < n_m[0] < n_m[1]:
      raise FlagError(f'--n_m={f.n_m} needs 0 < N < M, e.g. 2:4')
  if f.damp < 0:
    raise FlagError(f'--damp={f.damp} must be >= 0')
  return n_m


def calibration_tokens(spec, batches: int):
  """int32[batches * batch_size, seq_len] from the training split (seeded, shuffled)."""
  it = data.make_iterator(spec.data_source, 'train', seq_len=spec.train.seq_len,
                          batch_size=spec.train.batch_size, seed=spec.seed, shuffle=True,
                          repeat=True, data_dir=spec.data_dir, tokenizer=spec.data_tokenizer,
                          eod_id=spec.eod_id)
  out = np.concatenate([next(it)['inputs'] for _ in range(batches)])
  it.close()
  return out


def transplant(template, source, masks: dict, step) -> nnx.State:
  """The (model, optimizer) state `template` filled from `source` by path. `masks` replace
  the template's masks where given. When only the template has a pruner, the source's
  optimizer state moves under the pruner's `inner`, the pruner's step is set to `step` (so
  a one-shot mask is never recomputed) and masks not given start all kept; when only the
  source has one, its `inner` state moves out. Pruner to pruner, the state is copied."""
  src = {p: (v[...] if isinstance(v, nnx.Variable) else v) for p, v in nnx.to_flat_state(source)}
  tmpl = nnx.to_flat_state(template)
  pruner = lambda paths: any(p[:3] == (1, 'opt_state', 'inner') for p in paths)
  pruned_src, pruned_new = pruner(src), pruner(p for p, _ in tmpl)
  out = []
  for path, var in tmpl:
    want = var[...] if isinstance(var, nnx.Variable) else var
    own = path[:2] == (1, 'opt_state') and path[2:3] != ('inner',)   # the pruner's own
    if path[:3] == (1, 'opt_state', 'masks') and path[3:] in masks:
      value = masks[path[3:]]
    elif pruned_new and not pruned_src and own:
      value = step if path == (1, 'opt_state', 'step') else want
    elif pruned_new and not pruned_src and path[:3] == (1, 'opt_state', 'inner'):
      value = src[(1, 'opt_state') + path[3:]]
    elif pruned_src and not pruned_new and path[:2] == (1, 'opt_state'):
      value = src[(1, 'opt_state', 'inner') + path[2:]]
    else:
      value = src[path]
    if tuple(value.shape) != tuple(want.shape):
      raise ValueError(f'{"/".join(map(str, path))}: {tuple(value.shape)} does not fit the '
                       f'compressed model\'s {tuple(want.shape)}')
    out.append((path, var.replace(value) if isinstance(var, nnx.Variable) else value))
  return nnx.from_flat_state(out)


def _stack(leaves):
  """Variables (or arrays) of the G layers of one stacked leaf -> one value [G, ...]."""
  return jnp.stack([v[...] if isinstance(v, nnx.Variable) else v for v in leaves])


def _masks(opt) -> dict:
  """{parameter path: bool mask} of the optimizer's pruner; {} without one."""
  try:
    paths, values, _ = pruning.paths.flatten(pruning.masks(opt.opt_state))
  except ValueError:                                  # no pruner
    return {}
  return dict(zip(paths, values))


def _sizes(model) -> tuple[int, int]:
  """(parameters, non-zero parameters), embeddings included."""
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  return sum(x.size for x in leaves), int(sum(np.count_nonzero(x) for x in leaves))


def compress(f: Options) -> dict:
  """Compresses f.workdir into f.out (see the module docstring); returns the record it
  also writes to f.out/compress.json: before/after validation loss, bits per byte,
  (parameters, non-zero parameters), and the kept experts and their scores."""
  n_m = check_options(f)

  src_dir, dst_dir = pathlib.Path(f.workdir), pathlib.Path(f.out)
  if not (src_dir / 'checkpoints').is_dir():
    raise checkpoint.NoCheckpointError(f'--workdir={f.workdir} has no checkpoints/ to '
                                       'compress; train it first')
  src = checkpoint.Checkpoints(src_dir)
  loaded = {}

  def load(step):
    config = src.config(step)
    try:
      spec = resolve(config, jax.device_count(), jax.process_count())
    except ConfigError as e:
      m = config.mesh
      need = max(m.data, 1) * max(m.expert, 1) * max(m.model, 1)
      raise FlagError(f'the model in --workdir={f.workdir} was trained on the mesh data='
                      f'{m.data}, expert={m.expert}, model={m.model}, which does not fit the '
                      f'{jax.device_count()} device(s) here ({e}); rerun with '
                      f'--cpu_devices={need} (CPU) or on {need} devices') from None
    moe = spec.model.moe
    if f.method == 'experts' and moe and moe.n_group > 1:
      raise FlagError(f'--method=experts: the model in --workdir={f.workdir} limits each '
                      f'token to {moe.topk_group} of {moe.n_group} expert groups, which '
                      'removing experts would regroup; prune its kernels instead (e.g. '
                      '--method=wanda)')
    if f.method == 'experts' and not (moe and moe.k <= f.keep < moe.num_experts):
      raise FlagError(f'--keep={f.keep} must be at least k={moe.k} and below the '
                      f'{moe.num_experts} experts of the model in --workdir={f.workdir}'
                      if moe else f'--method=experts: --workdir={f.workdir} holds a dense '
                      'model')
    try:
      loop.check_vocab(spec)
    except loop.DataError as e:       # a ConfigError passes through newest(): not damage
      raise FlagError(e) from None
    # Pruned and compacted block by block: a scanned run is read unrolled (the checkpoint
    # converts) and written back in its own layout.
    spec = dataclasses.replace(spec, model=dataclasses.replace(spec.model, scan_layers=False))
    mesh = loop.make_mesh(spec)
    steps = build(spec, mesh)
    it = loop.data_iterator(spec, 'train', train=True)
    state = src.restore(step, steps.state, steps.shardings, it)
    loaded.update(config=config, spec=spec, mesh=mesh, steps=steps, it=it)
    return state

  step, state = src.newest(load)
  src.close()
  if step is None:
    raise checkpoint.NoCheckpointError(f'--workdir={f.workdir} holds no readable checkpoint')
  config, spec, mesh, it = loaded['config'], loaded['spec'], loaded['mesh'], loaded['it']
  model, opt = nnx.merge(loaded['steps'].graphdef, state)
  tokens = calibration_tokens(spec, f.calibration_batches)
  before = {**loop.evaluate(spec, model, mesh), 'params': _sizes(model)}
  new = config.copy_and_resolve_references()
  masks = {}
  source = nnx.state((model, opt))
  if f.method == 'experts':
    e = spec.model.moe.num_experts
    scores = experts.expert_scores(model, tokens, f.score)
    kept = experts.choose(scores, f.keep, spec.model.moe.k)
    if f.merge:
      experts.merge_into_kept(model, kept, experts.expert_scores(model, tokens, 'frequency'))
      source = nnx.state((model, opt))
    source = compaction.compact_experts(source, kept)
    new.moe.num_experts = f.keep
    new.moe.capacity_factor = config.moe.capacity_factor * f.keep / e   # same slots
    new.mesh.expert = math.gcd(spec.mesh['expert'], f.keep)
    new.mesh.data = -1
    record = {'kept': {str(i): v.tolist() for i, v in kept.items()},
              'scores': {str(i): v.tolist() for i, v in scores.items()}}
  else:
    prunable = roles.prunable(roles.param_roles(model), f.targets)
    options = dict(block_size=f.block_size, damp=f.damp) if f.method == 'sparsegpt' else {}
    try:
      masks = post_training.prune_model(model, tokens, method=f.method, sparsity=f.sparsity,
                                        n_m=n_m, prunable=prunable, **options)
    except ValueError as e:           # e.g. an M that does not divide a kernel's inputs
      raise FlagError(e) from None
    had = _masks(opt)                               # a weight the source pruned stays pruned
    masks = {p: m & had[p] if p in had else m for p, m in masks.items()}
    source = nnx.state((model, opt))
    new.pruning.update(sparsity=f.sparsity or 0.0, n_m=f'{n_m[0]}:{n_m[1]}' if n_m else '',
                       schedule='one_shot', start_step=0, targets=f.targets,
                       method='magnitude', structure='')
    record = {'masks': len(masks)}
  validate(new, jax.device_count(), jax.process_count())
  new_spec = resolve(new, jax.device_count(), jax.process_count())
  new_mesh = loop.make_mesh(new_spec)
  new_steps = build(new_spec, new_mesh)
  count = nnx.to_flat_state(nnx.state(opt))
  count = next(v[...] for p, v in count if p == ('step',))
  if new_spec.model.scan_layers:
    pat = layout.of_spec(new_spec.model)
    source = nnx.from_flat_state(layout.to_scanned(dict(nnx.to_flat_state(source)), pat, _stack))
    masks = layout.to_scanned(masks, pat)
  state = jax.device_put(transplant(new_steps.state, source, masks, count),
                         new_steps.shardings)
  # Written beside DST and renamed when complete: DST never holds a partial output.
  work = dst_dir.with_name(f'.{dst_dir.name}.incomplete')
  if work.exists():
    print(f'note: removing {work}, the partial output of an interrupted compress',
          file=sys.stderr)
    shutil.rmtree(work)
  dst = checkpoint.Checkpoints(work, keep=new.train.keep_checkpoints)
  dst.save(step, state, it, new, wait=True)
  dst.close()
  it.close()
  small, _ = nnx.merge(new_steps.graphdef, state)
  after = {**loop.evaluate(new_spec, small, new_mesh), 'params': _sizes(small)}
  write_workdir_config(work, new, 'sparse_jax.compress')
  if (src_dir / 'hf').is_dir():          # an imported model's source config and tokenizer,
    shutil.copytree(src_dir / 'hf', work / 'hf')           # which convert --to_hf writes back

  result = {'source': str(src_dir), 'step': step, 'method': f.method,
            'flags': {k: getattr(f, k) for k in ('sparsity', 'n_m', 'targets', 'keep', 'score',
                                                 'merge', 'calibration_batches')},
            **{name: {'val_loss': r['loss'], 'bpb': r.get('bpb', math.nan), 'params': r['params']}
               for name, r in (('before', before), ('after', after))}, **record}
  (work / 'compress.json').write_text(json.dumps(result, indent=1, default=float))
  if dst_dir.exists():
    dst_dir.rmdir()                 # empty: check_options refused one that holds files
  os.rename(work, dst_dir)
  return result


def main(argv=None):
  argv = sys.argv if argv is None else argv
  try:
    FLAGS(argv)
    options = Options(**{k: FLAGS[k].value for k in Options._fields})
    check_options(options)
  except (flags.Error, FlagError) as e:
    cli.die(e)
  cli.setup(FLAGS.cpu_devices)
  try:
    r = compress(options)
  except (FlagError, ConfigError, checkpoint.NoCheckpointError, loop.DataError) as e:
    cli.die(e)
  b, a = r['before'], r['after']
  print(f"\n{'':8}{'val loss':>10}{'bits/byte':>11}{'params':>12}{'non-zero':>12}")
  for name, row in (('before', b), ('after', a)):
    print(f"{name:8}{row['val_loss']:>10.4f}{row['bpb']:>11.4f}{row['params'][0]:>12,}"
          f"{row['params'][1]:>12,}")
  print(f'\nwrote {FLAGS.out} (step {r["step"]}); continue training it with\n  python -m '
        f'sparse_jax.train --config={pathlib.Path(FLAGS.out) / "config.py"} '
        f'--workdir={FLAGS.out} --config.train.steps=N')


if __name__ == '__main__':
  main()
