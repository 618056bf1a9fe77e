"""The training loop behind `python -m sparse_jax.train`: setup, resume, steps, evaluation,
checkpoints, metrics, and the guards (NaN/Inf, SIGTERM)."""
from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import pathlib
import signal
import sys
import time

import jax
import ml_collections
import numpy as np
from flax import nnx
from tqdm import tqdm

from sparse_jax import data, sharding
from sparse_jax.analysis.accounting import flops_from_config, params_from_config
from sparse_jax.config import ConfigError, Spec, resolve
from sparse_jax.training import checkpoint
from sparse_jax.training.metrics import MetricsWriter, WriteError
from sparse_jax.training.steps import bits_per_byte, build, eval_metrics, memory
from sparse_jax.upcycle import upcycle
from sparse_jax.workdir import check_resume


class DataError(ValueError):
  """The data source cannot be read (e.g. a TFDS dataset that was never prepared)."""


class WorkdirError(ValueError):
  """The workdir cannot be used: another trainer holds it, or it cannot be written."""


@contextlib.contextmanager
def _workdir_lock(workdir: pathlib.Path):
  """One trainer per workdir: an exclusive flock on workdir/trainer.lock, taken by process
  0 only (one per workdir, not per process) and released by the OS if the process dies."""
  if jax.process_index() != 0:
    yield
    return
  with open(workdir / 'trainer.lock', 'a+') as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or 'unknown'
      raise WorkdirError(f'{workdir} is in use by another trainer (pid {holder}); wait for '
                             'it to finish or stop it, or use another --workdir') from None
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    yield


def _to_host(tree) -> dict:
  """Metrics -> JSON values: floats, and lists for vectors (e.g. expert_load [E])."""
  return {k: v.tolist() if v.ndim else float(v) for k, v in jax.device_get(tree).items()}


def make_mesh(spec: Spec):
  return sharding.make_mesh(spec.mesh['data'], spec.mesh['expert'], spec.mesh['model'])


def data_iterator(spec: Spec, split, *, train: bool):
  t = spec.train
  try:
    return data.make_iterator(
        spec.data_source, split, seq_len=t.seq_len, batch_size=t.batch_size,
        seed=spec.seed, shuffle=train, repeat=train, data_dir=spec.data_dir,
        process_index=jax.process_index(), process_count=jax.process_count(),
        tokenizer=spec.data_tokenizer, eod_id=spec.eod_id)
  except ValueError as e:
    raise DataError(str(e)) from e


def _evaluate(eval_fn, state, spec: Spec, mesh, split='validation', batches=None) -> dict:
  batches = spec.train.eval_batches if batches is None else batches
  sums, n = None, 0
  it = data_iterator(spec, split, train=False)
  for batch in it:
    m = jax.device_get(eval_fn(state, sharding.put_batch(batch, mesh)))
    sums = m if sums is None else jax.tree.map(np.add, sums, m)
    n += 1
    if n == batches:
      break
  it.close()                                   # stop its prefetch thread now
  if not n:
    raise DataError(f'the {split!r} split of {spec.data_source} holds less than one batch of '
                    f'{spec.train.batch_size} x {spec.train.seq_len + 1} tokens; give more '
                    'text or a smaller batch')
  out = _to_host({k: v / n for k, v in sums.items()})
  if spec.data_tokenizer is None:              # byte tokens: nats per token -> bits per byte
    out['bpb'] = bits_per_byte(out['loss'])
  out['batches'] = n
  return out


def check_vocab(spec: Spec) -> None:
  """The data's tokens are ids the model has (an out-of-range id would embed as NaN)."""
  if spec.data_tokenizer is None:
    if spec.model.vocab_size < 256:
      raise DataError(f'model.vocab_size={spec.model.vocab_size} is below the 256 byte '
                      "tokens of data.tokenizer='bytes'; set --config.data.tokenizer to the "
                      "model's tokenizer.json")
    return
  from tokenizers import Tokenizer
  n = Tokenizer.from_file(spec.data_tokenizer).get_vocab_size()
  if n > spec.model.vocab_size:
    raise DataError(f'data.tokenizer={spec.data_tokenizer} has {n} tokens, more than '
                    f'model.vocab_size={spec.model.vocab_size}; give the tokenizer the model '
                    'was trained with')


def check_data(spec: Spec, info: dict) -> None:
  """Before anything compiles: token ids the model has, text to train on, and at least
  one validation batch (which train() needs at its first evaluation, eval_every steps
  in)."""
  check_vocab(spec)
  t, sizes = spec.train, {k: v.get('bytes') for k, v in info['splits'].items()}
  if sizes.get('train') == 0:
    if sizes.get('validation'):
      raise DataError(
          f'the train split of {spec.data_source} holds no text: all of its '
          f'{sizes["validation"]:,} bytes fall in the validation split (files are split by a '
          'hash of their path, about 1 in 20 to validation); give more files')
    raise DataError(f'the train split of {spec.data_source} holds no text (0 bytes); point '
                    '--config.data.source at files that are not empty')
  it = data_iterator(spec, 'validation', train=False)
  try:
    next(it)
  except StopIteration:
    need = t.batch_size * (t.seq_len + 1)
    raise DataError(
        f'the validation split of {spec.data_source} holds {sizes.get("validation", 0):,} '
        f'bytes, less than one batch of train.batch_size x (train.seq_len + 1) = {need:,} '
        'tokens; lower --config.train.batch_size or --config.train.seq_len, or give more '
        'data') from None
  finally:
    it.close()


def evaluate(spec: Spec, model, mesh, split: str = 'validation',
             batches: int | None = None) -> dict:
  """Loss (nats per token), bits per byte (byte tokens) and routing metrics of `model`,
  placed on `mesh`, over the first `batches` batches of `split` of spec.data_source, in
  order (default spec.train.eval_batches, what training reports; 0: the whole split). The
  metrics train() evaluates; no optimizer is built."""
  graphdef, state = nnx.split(model)
  step = jax.jit(lambda state, batch: eval_metrics(nnx.merge(graphdef, state), batch))
  return _evaluate(step, state, spec, mesh, split, batches)


@contextlib.contextmanager
def _sigterm_flag():
  """A flag set by SIGTERM while the block runs; the previous handler is restored after
  (signal handlers can only be installed from the main thread: elsewhere, no flag)."""
  stop = {'sigterm': False}
  try:
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.update(sigterm=True))
  except ValueError:
    previous = None
  try:
    yield stop
  finally:
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)


def train(config: ml_collections.ConfigDict, workdir: pathlib.Path,
          progress: tqdm | None = None) -> int:
  """Run (or resume) training of `config` in `workdir`; returns the process exit code.

  Raises config.ConfigError for a bad config, DataError for unreadable data and
  WorkdirError when another trainer holds the workdir or it cannot be written.
  progress: a caller's bar to advance one unit per step (e.g. one bar over many runs);
  by default each run draws its own.
  """
  spec = resolve(config, jax.device_count(), jax.process_count())
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / f'.writable.{os.getpid()}'    # one per process: they share the workdir
    probe.touch()
    probe.unlink()
  except OSError as e:
    raise WorkdirError(f'cannot write to --workdir={workdir}: {e.strerror}'
                       f'{" (it is a file)" if workdir.is_file() else ""}; give a directory '
                       'on a writable filesystem') from None
  with _workdir_lock(workdir):
    return _train(config, spec, workdir, progress)


def _train(config, spec: Spec, workdir: pathlib.Path, progress) -> int:
  lead = jax.process_index() == 0
  say = print if lead else (lambda *a, **k: None)
  t = spec.train
  mesh = make_mesh(spec)
  try:
    info = data.prepare(spec.data_source, spec.data_dir, verbose=lead)
  except ValueError as e:
    raise DataError(str(e)) from e
  check_data(spec, info)

  ckpt = checkpoint.Checkpoints(workdir, keep=t.keep_checkpoints)
  _refuse_unfit_resume(ckpt, config, workdir)        # before anything is built or compiled
  model = None
  if not ckpt.steps() and spec.upcycle_from:
    try:
      _, dense_spec, dense = checkpoint.load_model(pathlib.Path(spec.upcycle_from), mesh)
      model = upcycle(dense, spec.model, mesh=mesh, noise=spec.upcycle_noise,
                      router_init_scale=spec.upcycle_router_init_scale, seed=spec.seed)
    except ValueError as e:      # no checkpoint, an MoE source, another width or depth
      raise ConfigError(f'init.upcycle_from={spec.upcycle_from}: {e}') from None
    say(f'upcycled from {spec.upcycle_from} ({dense_spec.model.num_layers} dense '
        f'blocks -> {spec.model.moe.num_experts} experts per MoE block)')
  steps = build(spec, mesh, model)
  train_it = data_iterator(spec, 'train', train=True)

  changes = {}

  def resume(step):
    with _compress_hint(workdir):
      changes.update(check_resume(ckpt.config(step), config, f'{ckpt.dir} (step {step})', step))
      return ckpt.restore(step, steps.state, steps.shardings, train_it)

  start, state = ckpt.newest(resume)
  if start is None:
    state = steps.state
  else:
    say(f'resumed from step {start} in {ckpt.dir}')
    if start > t.steps:
      raise ConfigError(f'train.steps={t.steps} is below step {start} of the checkpoint in '
                        f'{ckpt.dir}; pass --config.train.steps={start} or more to continue '
                        'it, or use another --workdir')
  start = start or 0
  batch = sharding.put_batch(next(train_it), mesh)
  # Compiled ahead of time so that XLA's memory analysis of this very step is reported.
  train_step = steps.train.lower(state, batch).compile()
  mem = memory(steps, train_step)
  if changes:                  # recorded in this run's first row, like the memory figures
    mem['config_changes'] = {k: list(v) for k, v in changes.items()}
    say('resumed with ' + ', '.join(f'{k}={new!r} (was {old!r})'
                                    for k, (old, new) in changes.items()))
  if progress is not None and start:
    progress.update(start)

  counts = params_from_config(spec.model)
  flops = flops_from_config(spec.model, t.seq_len)
  say(f"data: {info['source']} fingerprint {json.dumps(info.get('fingerprint'))}")
  say(f"mesh: {dict(mesh.shape)} over {jax.device_count()} devices, "
      f"{jax.process_count()} process(es)")
  say(f"params: total {counts['total']:,} (+ embeddings {counts['embedding']:,}), "
      f"active per token {counts['active']:,}; training FLOPs per token "
      f"{flops['train']:.3g}")
  say(f"memory per device: state {mem['state_bytes_per_device']:,} bytes "
      f"(fsdp={spec.fsdp}), train step temporaries {mem['compiled_temp_bytes']:,} bytes "
      f"(remat={t.remat!r}, dtype={spec.model.dtype!r}, microbatches={t.microbatches})")
  writer = None
  tokens_per_step = t.batch_size * t.seq_len
  bar = progress or tqdm(total=t.steps, initial=start, disable=not lead, unit='step',
                         dynamic_ncols=True)
  profiling, code, last = False, 0, time.perf_counter()
  step = start
  with _sigterm_flag() as stop:
    try:
      writer = MetricsWriter(workdir, start if start else None)
      while step < t.steps:
        if spec.profile_steps and step == start + 1:          # after the compiling step
          jax.profiler.start_trace(str(workdir / 'profile'))
          profiling = True
        if batch is None:
          batch = sharding.put_batch(next(train_it), mesh)
        state, metrics = train_step(state, batch)
        batch = None
        step += 1
        ckpt.poll()
        m = _to_host(metrics)
        if not math.isfinite(m['loss']) or not math.isfinite(m['total_loss']):
          ckpt.settle()
          good = ckpt.newest_verified()
          print(f"error: loss is {m['loss']} at step {step}; stopped without saving. The "
                f"last good checkpoint is {'step ' + str(good) if good is not None else 'none'}"
                f" in {ckpt.dir}; lower train.lr or raise train.warmup_steps, "
                'then rerun to resume from it.', file=sys.stderr)
          code = 1
          break
        if profiling and step == start + 1 + spec.profile_steps:
          jax.profiler.stop_trace()
          profiling = False
        now = time.perf_counter()
        m['tokens_per_s'] = tokens_per_step / (now - last)
        last = now
        bar.update(1)
        bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{m['tokens_per_s']:.0f}",
                        drop=f"{m.get('dropped_fraction', 0.0):.3f}")
        if step % t.log_every == 0 or step == t.steps:
          writer.write({'step': step, **m, **mem})
          mem = {}                         # only in this run's first row
        if step % t.eval_every == 0 or step == t.steps:
          ev = _evaluate(steps.eval, state, spec, mesh)
          writer.write({'step': step, 'split': 'validation', **ev})
          bpb = f", {ev['bpb']:.4f} bits/byte" if 'bpb' in ev else ''
          bar.write(f"step {step}: validation loss {ev['loss']:.4f}{bpb}")
          last = time.perf_counter()
        if stop['sigterm']:
          ckpt.save(step, state, train_it, config, wait=True)
          bar.write(f'SIGTERM: saved step {step}; rerun the same command to resume.')
          break
        if step % t.checkpoint_every == 0 or step == t.steps:
          ckpt.save(step, state, train_it, config)
      ckpt.settle()
    except (checkpoint.SaveError, WriteError) as e:
      _report_failed_write(ckpt, e)
      code = 1
    finally:
      if profiling:
        jax.profiler.stop_trace()
      ckpt.close()
      if progress is None:
        bar.close()
      if writer is not None:
        writer.close()
  return code


@contextlib.contextmanager
def _compress_hint(workdir: pathlib.Path):
  """A refused resume of a sparse_jax.compress output names the config it needs."""
  try:
    yield
  except ConfigError as e:
    if (workdir / 'compress.json').exists() and (workdir / 'config.py').exists():
      raise ConfigError(f'{e} (this workdir was written by sparse_jax.compress: resume it '
                        f'with --config={workdir / "config.py"})') from None
    raise


def _refuse_unfit_resume(ckpt: checkpoint.Checkpoints, config, workdir: pathlib.Path):
  """check_resume against the newest step whose config reads (a damaged step is left to
  Checkpoints.newest), so that a refusal comes before the model and optimizer are built."""
  for step in ckpt.steps():
    try:
      saved = ckpt.config(step)
    except Exception:  # pylint: disable=broad-except  # damage: newest() names and handles it
      continue
    with _compress_hint(workdir):
      check_resume(saved, config, f'{ckpt.dir} (step {step})', step)
    return


def _report_failed_write(ckpt: checkpoint.Checkpoints, e: OSError | checkpoint.SaveError):
  """One line on stderr. A failed metrics or events write first settles the pending save,
  so the line names the newest verified checkpoint as it is now."""
  if isinstance(e, WriteError):
    with contextlib.suppress(checkpoint.SaveError):     # its own failure changes nothing
      ckpt.settle()
    good = ckpt.newest_verified()
    e = (f'{e}; the newest verified checkpoint is '
         f'{"step " + str(good) if good is not None else "none"} in {ckpt.dir}')
  print(f'error: {e}', file=sys.stderr, flush=True)
