"""Shared plumbing of the experiment scripts.

  - 8 simulated CPU devices (set before jax is imported: import this module first);
  - `sized(preset)`: a base config at a preset's model and training sizes;
  - `Runner`: trains configs in workdirs that resume after a crash (loop.train), under one
    overall progress bar, and reads back their validation curves and routing metrics;
  - `step_times`: train-step times of several configs, interleaved so drift hits all;
  - `curve_at` / `steps_to`: read a validation curve at a step or at a target loss;
  - `provenance` and `write_results`: every table carries its command, git revision,
    machine, device count, corpus fingerprint and seeds.
"""
from __future__ import annotations

import os

if 'xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_force_host_platform_device_count=8').strip()

import contextlib  # noqa: E402
import copy  # noqa: E402
import csv  # noqa: E402
import datetime  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from sparse_jax import data, loop, sharding, steps  # noqa: E402
from sparse_jax.config import base_config, validate  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / 'experiments' / 'results'
RUNS = ROOT / 'runs'

# Model and training sizes shared by the scripts. 'smoke' exists for the tests only.
SIZES = {
    'smoke': dict(d_model=32, num_layers=2, num_heads=2, d_ff=64, batch_size=8, seq_len=32,
                  steps=3, warmup_steps=1, eval_every=1, eval_batches=1),
    'quick': dict(d_model=128, num_layers=4, num_heads=4, d_ff=512, batch_size=16,
                  seq_len=128, steps=200, warmup_steps=20, eval_every=25, eval_batches=4),
    'full': dict(d_model=128, num_layers=4, num_heads=4, d_ff=512, batch_size=16,
                 seq_len=128, steps=250, warmup_steps=25, eval_every=25, eval_batches=8),
}


def sized(preset: str, **overrides):
  """base_config() at the preset's sizes; keyword overrides win (same names as SIZES)."""
  s = {**SIZES[preset], **overrides}
  c = base_config()
  for key in ('d_model', 'num_layers', 'num_heads', 'd_ff'):
    c.model[key] = s[key]
  for key in ('batch_size', 'seq_len', 'steps', 'warmup_steps', 'eval_every', 'eval_batches'):
    c.train[key] = s[key]
  c.train.lr = 2e-3
  # Switch's 0.1x init for every model, dense ones too, so that a dense-vs-MoE gap is not an
  # init gap (quick preset, seed 0: the dense model reached 2.030 at 0.1x vs 2.049 at 1x).
  c.model.init_scale = 0.1
  c.train.log_every = 1
  c.train.checkpoint_every = min(s['steps'], max(10, s['steps'] // 4))
  c.train.keep_checkpoints = 1
  c.mesh.data, c.mesh.expert = 8, 1
  return c


def moe(c, num_experts=8, k=1, capacity_factor=1.25, expert_axis=8, **fields):
  """A copy of c with Switch-style MoE blocks (every other block) on an expert-parallel
  mesh of `expert_axis` devices."""
  c = copy.deepcopy(c)
  c.moe.num_experts, c.moe.k, c.moe.capacity_factor = num_experts, k, capacity_factor
  c.moe.moe_every, c.moe.moe_offset = 2, 1
  c.mesh.expert = expert_axis if num_experts % expert_axis == 0 else 1
  c.mesh.data = 8 // c.mesh.expert
  for key, value in fields.items():
    c.moe[key] = value
  return c


def use_compilation_cache(runs_root: pathlib.Path):
  """Persist compiled steps under the runs folder: the timing phase and reruns reuse
  the training runs' executables instead of compiling them again."""
  jax.config.update('jax_compilation_cache_dir', str(runs_root / '.jax_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


class RunError(RuntimeError):
  """A training run exited non-zero; its log names the cause."""


class Runner:
  """Trains named configs under runs/<study>/<name>, one overall progress bar.

  A workdir whose saved config equals the new one resumes (or is reused when finished);
  one with another config is wiped, so results always come from the code that ran.
  """

  def __init__(self, study: str, total_steps: int, root: pathlib.Path = RUNS):
    use_compilation_cache(root)
    self.root = root / study
    self.bar = tqdm(total=total_steps, unit='step', dynamic_ncols=True, desc=study)

  def train(self, name: str, config, label: str | None = None) -> dict:
    validate(config, jax.device_count())
    workdir = self.root / name
    saved = workdir / 'config.json'
    if saved.exists() and saved.read_text() != config.to_json():
      shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    saved.write_text(config.to_json())
    self.bar.set_description(label or name)
    with open(workdir / 'log.txt', 'a') as log, contextlib.redirect_stdout(log):
      code = loop.train(config, workdir, progress=self.bar)
    if code:
      raise RunError(f'run {label or name} exited with {code}; see {workdir / "log.txt"}')
    return read_run(workdir) | {'workdir': workdir}

  def train_all(self, configs: dict) -> dict:
    """{label: config} -> {label: result}. Workdirs are named by a hash of the config, so
    identical configs (in one script or across scripts sharing a study) train once."""
    return {label: self.train(hashlib.sha1(c.to_json().encode()).hexdigest()[:12], c, label)
            for label, c in configs.items()}

  def close(self):
    self.bar.close()


def read_run(workdir: pathlib.Path, tail: float = 0.2) -> dict:
  """Validation curve and final metrics of a finished run.

  Routing metrics are means over the last `tail` of training steps (their noise is large
  step to step); nonzero_params is the last logged value.
  """
  rows = [json.loads(r) for r in (workdir / 'metrics.jsonl').read_text().splitlines() if r]
  evals = [r for r in rows if r.get('split') == 'validation']
  train = [r for r in rows if r.get('split') != 'validation']
  last = train[-max(1, int(len(train) * tail)):]
  out = {'curve': [(r['step'], r['loss']) for r in evals],
         'val_loss': evals[-1]['loss'], 'bpb': evals[-1]['bpb'], 'steps': train[-1]['step']}
  for key in ('dropped_fraction', 'max_violation', 'router_z_loss', 'load_balance_loss',
              'router_entropy'):
    if key in last[0]:
      out[key] = float(np.mean([r[key] for r in last]))
  if 'nonzero_params' in train[-1]:
    out['nonzero_params'] = train[-1]['nonzero_params']
  return out


def step_fn(config):
  """A jitted train step on config's mesh, its state and a random batch on the mesh."""
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.expert, config.mesh.model)
  graphdef, state, sh = loop.build_state(config, mesh)
  fn = jax.jit(steps.make_train_step(graphdef, config),
               in_shardings=(sh, sharding.batch_sharding(mesh)), out_shardings=(sh, None),
               donate_argnums=0)
  t = config.train
  tokens = np.random.default_rng(0).integers(0, 256, (t.batch_size, t.seq_len + 1))
  batch = sharding.put_batch({'inputs': tokens[:, :-1].astype(np.int32),
                              'targets': tokens[:, 1:].astype(np.int32)}, mesh)
  return fn, state, batch


def step_times(configs: dict, n: int = 8) -> dict[str, float]:
  """Median seconds per train step of each config, measured interleaved after 2 warm-up
  steps (the batches are random tokens already on the mesh: model time, not input)."""
  runs = {name: list(step_fn(c)) for name, c in configs.items()}
  times = {name: [] for name in runs}
  for it in range(n + 2):
    for name, r in runs.items():
      t0 = time.perf_counter()
      r[1], m = r[0](r[1], r[2])
      jax.block_until_ready(m)
      if it >= 2:
        times[name].append(time.perf_counter() - t0)
  return {name: statistics.median(t) for name, t in times.items()}


def curve_at(curve, step: float) -> float | None:
  """Validation loss at `step`, linear between evaluations; None outside the curve."""
  xs, ys = zip(*curve)
  return float(np.interp(step, xs, ys)) if xs[0] <= step <= xs[-1] else None


def steps_to(curve, target: float) -> float | None:
  """First step at which the (linearly interpolated) validation loss reaches target."""
  for (s0, y0), (s1, y1) in zip(curve, curve[1:]):
    if y1 <= target:
      return s0 + (s1 - s0) * (y0 - target) / (y0 - y1) if y0 > target else s0
  return curve[0][0] if curve and curve[0][1] <= target else None


def mean_std(xs) -> tuple[float, float]:
  xs = [x for x in xs if x is not None]
  if not xs:
    return float('nan'), float('nan')
  return float(np.mean(xs)), (float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0)


def fmt(mean: float, std: float | None = None, digits: int = 4) -> str:
  if mean is None or mean != mean:
    return '–'
  return f'{mean:.{digits}f}' + (f' ± {std:.{digits}f}' if std else '')


def provenance(seeds, source: str = 'stdlib') -> dict:
  """What a reader needs to rerun a table: command, revision, machine, data, seeds."""
  info = data.prepare(source, None, verbose=False)
  rev = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT,
                       capture_output=True, text=True).stdout.strip()
  dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=ROOT,
                         capture_output=True, text=True).stdout.strip()
  return {
      'command': ' '.join(['python', os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)] +
                          sys.argv[1:]),
      'git_rev': rev + ('+uncommitted' if dirty else ''),
      'date': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
      'machine': f'{platform.machine()}, {os.cpu_count()} CPU cores',
      'devices': f'{jax.device_count()} x {jax.devices()[0].platform}',
      'jax': jax.__version__,
      'corpus': {'source': info['source'], 'fingerprint': info.get('fingerprint')},
      'seeds': list(seeds),
  }


def header(title: str, meta: dict) -> str:
  fp = meta['corpus']['fingerprint'] or {}
  fp_text = ', '.join(f'{k} {v}' for k, v in fp.items()) if isinstance(fp, dict) else fp
  return (f'# {title}\n\n`{meta["command"]}` at git {meta["git_rev"]}, {meta["date"]}; '
          f'{meta["machine"]}, {meta["devices"]}, jax {meta["jax"]}; corpus '
          f'{meta["corpus"]["source"]} ({fp_text}); seeds {meta["seeds"]}.\n\n')


def write_results(stem: str, markdown: str, rows: list[dict], meta: dict,
                  out_dir: pathlib.Path = RESULTS) -> pathlib.Path:
  """<stem>.md (the markdown as given), .csv (rows) and .json (meta + rows)."""
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / f'{stem}.md').write_text(markdown)
  (out_dir / f'{stem}.json').write_text(json.dumps({'meta': meta, 'rows': rows}, indent=1,
                                                   default=float))
  keys = list(dict.fromkeys(k for r in rows for k in r if not isinstance(r[k], (list, dict))))
  with open(out_dir / f'{stem}.csv', 'w', newline='') as f:
    w = csv.DictWriter(f, keys, extrasaction='ignore')
    w.writeheader()
    w.writerows(rows)
  return out_dir / f'{stem}.md'


def table(columns: list[str], rows: list[list]) -> str:
  lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
  lines += ['| ' + ' | '.join(str(x) for x in r) + ' |' for r in rows]
  return '\n'.join(lines) + '\n'


def common_args(ap, default_preset='quick'):
  ap.add_argument('--preset', choices=sorted(SIZES), default=default_preset,
                  help="sizes and budget ('smoke' is for the tests)")
  ap.add_argument('--out', type=pathlib.Path, default=RESULTS, help='results folder')
  ap.add_argument('--runs', type=pathlib.Path, default=RUNS,
                  help='workdirs (checkpoints resume after a crash)')
  return ap


def verdict(claim: str, holds: bool, evidence: str) -> str:
  """One line saying whether a published trend holds in this run, with the numbers."""
  return f"- {claim}: **{'holds' if holds else 'does not hold'}** here ({evidence}).\n"


def run_study(study: str, preset: str, configs: dict, runs_root: pathlib.Path) -> dict:
  """Train {label: config} under one progress bar; {label: result}."""
  runner = Runner(f'{study}_{preset}', sum(c.train.steps for c in configs.values()),
                  root=runs_root)
  try:
    return runner.train_all(configs)
  finally:
    runner.close()


def validation_tokens(config, batches: int = 1) -> np.ndarray:
  """The first `batches` validation batches' inputs, int32[batches * batch_size, seq_len]."""
  it = data.make_iterator(config.data.source, 'validation', seq_len=config.train.seq_len,
                          batch_size=config.train.batch_size, seed=0, shuffle=False,
                          repeat=False, data_dir=config.data.data_dir or None)
  out = [next(it)['inputs'] for _ in range(batches)]
  it.close()
  return np.concatenate(out)


def load(result: dict):
  """(config, model, mesh) of a finished run from Runner.train."""
  config = json.loads((result['workdir'] / 'config.json').read_text())
  mesh = sharding.make_mesh(config['mesh']['data'], config['mesh']['expert'],
                            config['mesh']['model'])
  config, model = loop.load_model(result['workdir'], mesh)
  return config, model, mesh


def describe(c) -> str:
  """'200 steps of 16x128 bytes, d_model 128, 4 layers' for a table's preamble."""
  return (f'{c.train.steps} steps of {c.train.batch_size}x{c.train.seq_len} bytes, d_model '
          f'{c.model.d_model}, {c.model.num_layers} layers')
