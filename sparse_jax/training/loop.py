"""The training loop behind `python -m sparse_jax.train`: setup, resume, steps, evaluation,
checkpoints, metrics, and the guards (NaN/Inf, SIGTERM)."""
from __future__ import annotations

import json
import math
import pathlib
import signal
import sys
import time

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx
from tqdm import tqdm

from sparse_jax import data, models, sharding, steps
from sparse_jax.upcycle import upcycle


class DataError(ValueError):
  """The data source cannot be read (e.g. a TFDS dataset that was never prepared)."""


class MetricsWriter:
  """metrics.jsonl and TensorBoard events, written by process 0 only."""

  def __init__(self, workdir: pathlib.Path, resume_step: int | None):
    self.active = jax.process_index() == 0
    self.path = workdir / 'metrics.jsonl'
    self.tb = None
    if not self.active:
      return
    # Rows past the checkpoint we resume from were made by the run that died: drop them.
    rows = []
    if resume_step is not None and self.path.exists():
      rows = [r for r in self.path.read_text().splitlines()
              if r and json.loads(r)['step'] <= resume_step]
    self.path.write_text(''.join(r + '\n' for r in rows))
    from tensorboardX import SummaryWriter
    self.tb = SummaryWriter(str(workdir / 'tb'))

  def write(self, row: dict):
    if not self.active:
      return
    with self.path.open('a') as f:
      f.write(json.dumps(row) + '\n')
    tag = row.get('split', 'train')
    for k, v in row.items():
      if k not in ('step', 'split') and isinstance(v, (int, float)):
        self.tb.add_scalar(f'{tag}/{k}', v, row['step'])

  def close(self):
    if self.tb is not None:
      self.tb.close()


def _to_host(tree) -> dict:
  return {k: float(v) for k, v in jax.device_get(tree).items()}


def _checkpointable(state):
  """Typed PRNG keys -> raw uint32 data, which orbax can store."""
  return jax.tree.map(lambda x: jax.random.key_data(x)
                      if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x, state)


def _restore_keys(template, restored):
  return jax.tree.map(lambda t, r: jax.random.wrap_key_data(r, impl=jax.random.key_impl(t))
                      if jax.dtypes.issubdtype(t.dtype, jax.dtypes.prng_key) else r,
                      template, restored)


def _abstract(state, shardings):
  """What orbax restores into: shapes, dtypes and shardings of the checkpointed state."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      _checkpointable(state), shardings)


def build_state(config, mesh, model=None):
  """(graphdef, state, shardings) of (model, optimizer), placed on the mesh."""
  if model is None:
    model = models.TransformerLM(config.model, config.moe, mesh=mesh,
                                 rngs=nnx.Rngs(config.seed))
  opt = nnx.Optimizer(model, steps.make_optimizer(config), wrt=nnx.Param)
  graphdef, state = nnx.split((model, opt))
  shardings = sharding.state_shardings(state, mesh)
  return graphdef, jax.device_put(state, shardings), shardings


def load_model(run_dir: pathlib.Path, mesh):
  """(config, model) of a training run's latest checkpoint, placed on `mesh`."""
  mngr = ocp.CheckpointManager((run_dir / 'checkpoints').absolute())
  step = mngr.latest_step()
  if step is None:
    raise DataError(f'no checkpoint in {run_dir / "checkpoints"} to load a model from')
  config = ml_collections.ConfigDict(mngr.restore(step, args=ocp.args.Composite(
      config=ocp.args.JsonRestore()))['config'])
  graphdef, state, shardings = build_state(config, mesh)
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(_abstract(state, shardings))))
  model, _ = nnx.merge(graphdef, _restore_keys(state, restored['state']))
  mngr.close()
  return config, model


def _iterator(config, split, *, train: bool):
  t = config.train
  try:
    return data.make_iterator(
        config.data.source, split, seq_len=t.seq_len, batch_size=t.batch_size,
        seed=config.seed, shuffle=train, repeat=train, data_dir=config.data.data_dir or None,
        process_index=jax.process_index(), process_count=jax.process_count())
  except ValueError as e:
    raise DataError(str(e)) from e


def _evaluate(eval_fn, state, config, mesh) -> dict:
  sums, n = {}, 0
  it = _iterator(config, 'validation', train=False)
  for batch in it:
    m = _to_host(eval_fn(state, sharding.put_batch(batch, mesh)))
    sums = {k: sums.get(k, 0.0) + v for k, v in m.items()}
    n += 1
    if n == config.train.eval_batches:
      break
  it.close()                                   # stop its prefetch thread now
  if n == 0:
    raise DataError('the validation split yielded no batch; lower train.batch_size or '
                    'train.seq_len, or use a larger corpus')
  out = {k: v / n for k, v in sums.items()}
  out['bpb'] = steps.bits_per_byte(out['loss'])
  out['batches'] = n
  return out


def evaluate(config, model, mesh) -> dict:
  """Validation loss (nats per token) and bits per byte of `model`, as train() reports them."""
  graphdef, state = nnx.split(model)

  def eval_step(state, batch):
    _, (ce, _) = steps.lm_loss(nnx.merge(graphdef, state), batch, train=False,
                               lb_coef=0.0, z_coef=0.0)
    return {'loss': ce}

  return _evaluate(jax.jit(eval_step), state, config, mesh)


def train(config, workdir: pathlib.Path, progress: tqdm | None = None) -> int:
  """Run (or resume) training; returns the process exit code.

  progress: a caller's bar to advance one unit per step (e.g. one bar over many runs);
  by default each run draws its own.
  """
  lead = jax.process_index() == 0
  say = print if lead else (lambda *a, **k: None)
  workdir.mkdir(parents=True, exist_ok=True)
  t = config.train
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.expert, config.mesh.model)
  try:
    info = data.prepare(config.data.source, config.data.data_dir or None, verbose=lead)
  except ValueError as e:
    raise DataError(str(e)) from e

  ckpt = ocp.CheckpointManager(
      (workdir / 'checkpoints').absolute(),
      options=ocp.CheckpointManagerOptions(max_to_keep=t.keep_checkpoints, create=True,
                                           enable_async_checkpointing=True))
  start = ckpt.latest_step()
  model = None
  if start is None and config.init.upcycle_from:
    dense_config, dense = load_model(pathlib.Path(config.init.upcycle_from), mesh)
    model = upcycle(dense, config, mesh=mesh, noise=config.init.upcycle_noise,
                    router_init_scale=config.init.router_init_scale, seed=config.seed)
    say(f'upcycled from {config.init.upcycle_from} ({dense_config.model.num_layers} dense '
        f'blocks -> {config.moe.num_experts} experts per MoE block)')
  graphdef, state, shardings = build_state(config, mesh, model)
  batch_sharding = sharding.batch_sharding(mesh)
  train_fn = jax.jit(steps.make_train_step(graphdef, config),
                     in_shardings=(shardings, batch_sharding),
                     out_shardings=(shardings, None), donate_argnums=0)
  eval_fn = jax.jit(steps.make_eval_step(graphdef, config),
                    in_shardings=(shardings, batch_sharding))
  train_it = _iterator(config, 'train', train=True)

  if start is not None:
    restored = ckpt.restore(start, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_abstract(state, shardings)),
        data=grain.checkpoint.CheckpointRestore(train_it)))
    state = _restore_keys(state, restored.state)
    say(f'resumed from step {start} in {workdir / "checkpoints"}')
  start = start or 0
  if progress is not None and start:
    progress.update(start)

  counts, flops = models.count_params(config), models.flops_per_token(config)
  say(f"data: {info['source']} fingerprint {json.dumps(info.get('fingerprint'))}")
  say(f"mesh: {dict(mesh.shape)} over {jax.device_count()} devices, "
      f"{jax.process_count()} process(es)")
  say(f"params: total {counts['total']:,} (+ embeddings {counts['embedding']:,}), "
      f"active per token {counts['active']:,}; training FLOPs per token "
      f"{flops['train']:.3g}")
  writer = MetricsWriter(workdir, start if start else None)

  def save(step, state, *, wait=False):
    ckpt.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_checkpointable(state)),
        data=grain.checkpoint.CheckpointSave(train_it),
        config=ocp.args.JsonSave(config.to_dict())))
    if wait:
      ckpt.wait_until_finished()

  stop = {'sigterm': False}
  signal.signal(signal.SIGTERM, lambda *_: stop.update(sigterm=True))
  tokens_per_step = t.batch_size * t.seq_len
  bar = progress or tqdm(total=t.steps, initial=start, disable=not lead, unit='step',
                         dynamic_ncols=True)
  profiling, code, last = False, 0, time.perf_counter()
  step = start
  try:
    while step < t.steps:
      if config.profile_steps and step == start + 1:          # after the compiling step
        jax.profiler.start_trace(str(workdir / 'profile'))
        profiling = True
      batch = sharding.put_batch(next(train_it), mesh)
      state, metrics = train_fn(state, batch)
      step += 1
      m = _to_host(metrics)
      if not math.isfinite(m['loss']) or not math.isfinite(m['total_loss']):
        ckpt.wait_until_finished()
        good = ckpt.latest_step()
        print(f"error: loss is {m['loss']} at step {step}; stopped without saving. The last "
              f"good checkpoint is {'step ' + str(good) if good is not None else 'none'} in "
              f"{workdir / 'checkpoints'}; lower train.lr or raise train.warmup_steps, then "
              'rerun to resume from it.', file=sys.stderr)
        code = 1
        break
      if profiling and step == start + 1 + config.profile_steps:
        jax.profiler.stop_trace()
        profiling = False
      now = time.perf_counter()
      m['tokens_per_s'] = tokens_per_step / (now - last)
      last = now
      bar.update(1)
      bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{m['tokens_per_s']:.0f}",
                      drop=f"{m.get('dropped_fraction', 0.0):.3f}")
      if step % t.log_every == 0 or step == t.steps:
        writer.write({'step': step, **m})
      if step % t.eval_every == 0 or step == t.steps:
        ev = _evaluate(eval_fn, state, config, mesh)
        writer.write({'step': step, 'split': 'validation', **ev})
        bar.write(f"step {step}: validation loss {ev['loss']:.4f}, {ev['bpb']:.4f} bits/byte")
        last = time.perf_counter()
      if stop['sigterm']:
        save(step, state, wait=True)
        bar.write(f'SIGTERM: saved step {step}; rerun the same command to resume.')
        break
      if step % t.checkpoint_every == 0 or step == t.steps:
        save(step, state)
  finally:
    if profiling:
      jax.profiler.stop_trace()
    ckpt.wait_until_finished()
    ckpt.close()
    if progress is None:
      bar.close()
    writer.close()
  return code
