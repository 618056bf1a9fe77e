"""Shared plumbing of the experiment scripts.

  - `setup_devices(n)`: n simulated CPU devices; each script's main() calls it first;
  - `sized(preset)`: a base config at a preset's model and training sizes;
  - `Runner` / `run_study`: train configs in workdirs named by config hash that resume
    after a crash (loop.train), under one overall progress bar; a finished run is reused
    only while the library source that trained it is unchanged;
  - `curve_at` / `steps_to`: read a validation curve at a step or at a target loss;
  - `provenance`, `header`, `report` and `write_results`: every table carries its
    command, git revision, library hash, machine, device count, corpus and seeds.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import datetime
import functools
import hashlib
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys

import jax
import numpy as np
from tqdm import tqdm

import sparse_jax
from sparse_jax import cli, data
from sparse_jax.config import Spec, base_config, resolve
from sparse_jax.training import checkpoint, loop

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / 'experiments' / 'results'
RUNS = ROOT / 'runs'
LIBRARY = pathlib.Path(sparse_jax.__file__).resolve().parent   # the code that runs

# Model and training sizes shared by the scripts. 'smoke' exists for the tests only.
SIZES = {
    'smoke': dict(d_model=32, num_layers=2, num_heads=2, d_ff=64, batch_size=8, seq_len=32,
                  steps=3, warmup_steps=1, eval_every=1, eval_batches=1),
    'quick': dict(d_model=128, num_layers=4, num_heads=4, d_ff=512, batch_size=16,
                  seq_len=128, steps=200, warmup_steps=20, eval_every=25, eval_batches=4),
    'full': dict(d_model=128, num_layers=4, num_heads=4, d_ff=512, batch_size=16,
                 seq_len=128, steps=250, warmup_steps=25, eval_every=25, eval_batches=8),
}


# XLA:CPU (jax 0.10.2) schedules for concurrency by default, and then per-layer remat saves
# no memory (experiments/bench_remat_cpu.py); this flag picks its memory-aware scheduler.
MEMORY_AWARE_CPU_SCHEDULER = '--xla_cpu_enable_concurrency_optimized_scheduler=false'


def cpu_env(*, memory_aware_cpu_scheduler: bool = False) -> dict:
  """Environment for a child process on XLA:CPU with one device and the chosen scheduler."""
  return dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=(
      MEMORY_AWARE_CPU_SCHEDULER if memory_aware_cpu_scheduler else ''))


def setup_devices(n: int = 8, *, memory_aware_cpu_scheduler: bool = False) -> None:
  """n simulated CPU devices (and, if asked, XLA:CPU's memory-aware scheduler), freed
  memory kept (cli.keep_freed_memory). Must run before the first JAX computation; a
  process that already runs on n devices (e.g. under the tests' conftest) is left as it
  is."""
  cli.keep_freed_memory()
  if memory_aware_cpu_scheduler:     # read when the CPU backend starts
    os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {MEMORY_AWARE_CPU_SCHEDULER}"
  try:
    jax.config.update('jax_num_cpu_devices', n)
  except RuntimeError:                        # backends already up: fine if they fit
    if jax.device_count() != n:
      raise RuntimeError(f'the experiments need {n} devices but JAX already started with '
                         f'{jax.device_count()}; call common.setup_devices({n}) before any '
                         'JAX computation') from None


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


def override(c, **values):
  """A copy of config c with values set; a dict sets keys of that section:
  override(c, seed=1, model=dict(activation='relu'))."""
  c = copy.deepcopy(c)
  for key, value in values.items():
    if isinstance(value, dict):
      for k, v in value.items():
        c[key][k] = v
    else:
      c[key] = value
  return c


def moe(c, num_experts=8, k=1, capacity_factor=1.25, expert_axis=8, **fields):
  """A copy of c with Switch-style MoE blocks (every other block) on an expert-parallel
  mesh of `expert_axis` devices; fields set other moe keys."""
  expert = expert_axis if num_experts % expert_axis == 0 else 1
  return override(c, moe=dict(num_experts=num_experts, k=k, capacity_factor=capacity_factor,
                              moe_every=2, moe_offset=1, **fields),
                  mesh=dict(expert=expert, data=8 // expert))


def gmp(c, sparsity, **fields):
  """A copy of c magnitude-pruned to `sparsity` on the GMP schedule, its masks updated 20
  times over training; fields set other pruning keys."""
  return override(c, pruning=dict(sparsity=sparsity,
                                  update_every=max(1, c.train.steps // 20), **fields))


def use_compilation_cache(runs_root: pathlib.Path):
  """Persist compiled steps under the runs folder: the timing phase and reruns reuse
  the training runs' executables instead of compiling them again."""
  jax.config.update('jax_compilation_cache_dir', str(runs_root / '.jax_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


# ---------------------------------------------------------------- code identity

def _git(*args) -> str:
  return subprocess.run(['git', *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def git_rev() -> str:
  """Short HEAD revision, '+uncommitted' when tracked files other than the results (the
  outputs a chain of scripts writes) differ from it."""
  dirty = _git('status', '--porcelain', '--untracked-files=no', '--', '.',
               ':(exclude)experiments/results')
  return _git('rev-parse', '--short', 'HEAD') + ('+uncommitted' if dirty else '')


@functools.cache
def library_hash(root: pathlib.Path = LIBRARY) -> str:
  """sha256 over the library's *.py files in path order (each path and its contents'
  sha256): what decides whether a finished run is still the code that runs now. Cached:
  the code a process runs is the code it imported at the start."""
  h = hashlib.sha256()
  for path in sorted(root.rglob('*.py'), key=lambda p: p.relative_to(root).as_posix()):
    h.update(f'{path.relative_to(root).as_posix()}\0'.encode())
    h.update(hashlib.sha256(path.read_bytes()).digest())
  return h.hexdigest()


def code_version() -> dict:
  return {'git_rev': git_rev(), 'library_sha256': library_hash()}


# ------------------------------------------------------------------------ runs

class RunError(RuntimeError):
  """A training run exited non-zero; its log names the cause."""


def run_name(config) -> str:
  """The workdir name of a config, the only one: identical configs (in one script or
  across scripts sharing a study) train once."""
  return hashlib.sha1(config.to_json().encode()).hexdigest()[:12]


def stale(workdir: pathlib.Path, config, library: str) -> str | None:
  """Why an existing workdir cannot be resumed or reused (None: it can, or is new).
  It records the config (config.json) and the code (code.json) that trained it."""
  if not workdir.exists():
    return None
  saved, code = workdir / 'config.json', workdir / 'code.json'
  if not saved.exists() or saved.read_text() != config.to_json():
    return 'its config differs'
  recorded = json.loads(code.read_text())['library_sha256'] if code.exists() else 'unrecorded'
  if recorded != library:
    return f'library source changed (sha256 {recorded[:12]} -> {library[:12]})'
  return None


class Runner:
  """Trains configs under runs/<study>/<run_name(config)>, one overall progress bar.

  A workdir is resumed (or reused when finished) only when its saved config and library
  hash equal today's; otherwise it is wiped and retrained, so results always come from
  the code that runs now.
  """

  def __init__(self, study: str, total_steps: int, root: pathlib.Path = RUNS):
    use_compilation_cache(root)
    self.root = root / study
    self.code = code_version()
    self.bar = tqdm(total=total_steps, unit='step', dynamic_ncols=True, desc=study)

  def train(self, config, label: str) -> dict:
    """{curve, val_loss, ...} of read_run, plus the workdir, the resolved spec and the
    code record (git_rev, library_sha256) of the run that trained it."""
    spec = resolve(config, jax.device_count())
    workdir = self.root / run_name(config)
    why = stale(workdir, config, self.code['library_sha256'])
    if why:
      shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / 'config.json').write_text(config.to_json())
    if not (workdir / 'code.json').exists():                  # kept: who trained it
      (workdir / 'code.json').write_text(json.dumps(self.code))
    self.bar.set_description(label)
    with open(workdir / 'log.txt', 'a') as log:
      if why:
        note = f'{label}: retraining in {workdir}: {why}'
        self.bar.write(note)                                  # the console
        print(note, file=log)                                 # and the run's own log
      with contextlib.redirect_stdout(log):
        code = loop.train(config, workdir, progress=self.bar)
    if code:
      raise RunError(f'run {label} exited with {code}; see {workdir / "log.txt"}')
    return read_run(workdir) | {'workdir': workdir, 'spec': spec,
                                'code': json.loads((workdir / 'code.json').read_text())}

  def train_all(self, configs: dict) -> dict:
    """{label: config} -> {label: result}."""
    return {label: self.train(c, label) for label, c in configs.items()}

  def close(self):
    self.bar.close()


def continue_run(workdir: pathlib.Path, config, progress=None) -> dict:
  """Train the existing `workdir` on under `config` (e.g. a compressed model's recovery
  fine-tune: its checkpoint is resumed), logging to workdir/log.txt; read_run of it."""
  with open(workdir / 'log.txt', 'a') as log, contextlib.redirect_stdout(log):
    code = loop.train(config, workdir, progress=progress)
  if code:
    raise RunError(f'{workdir} exited with {code}; see {workdir / "log.txt"}')
  return read_run(workdir)


def run_study(study: str, preset: str, configs: dict, runs_root: pathlib.Path) -> dict:
  """Train {label: config} under one progress bar in runs/<study>_<preset>; {label: result}."""
  runner = Runner(f'{study}_{preset}', sum(c.train.steps for c in configs.values()),
                  root=runs_root)
  try:
    return runner.train_all(configs)
  finally:
    runner.close()


def run_seeds(study: str, args, variants: dict, seeds) -> dict[str, list[dict]]:
  """Train every {label: config} at every seed (seed-major, so each variant has a first
  seed early) in one study; {label: [result per seed]}."""
  configs = {f'{label} seed {s}': override(c, seed=s)
             for s in seeds for label, c in variants.items()}
  res = run_study(study, args.preset, configs, args.runs)
  return {label: [res[f'{label} seed {s}'] for s in seeds] for label in variants}


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


def load(result: dict):
  """(spec, model, mesh) of a finished run from Runner.train."""
  mesh = loop.make_mesh(result['spec'])
  _, spec, model = checkpoint.load_model(result['workdir'], mesh)
  return spec, model, mesh


def validation_tokens(spec: Spec, batches: int = 1) -> np.ndarray:
  """The first `batches` validation batches' inputs, int32[batches * batch_size, seq_len]."""
  it = data.make_iterator(spec.data_source, 'validation', seq_len=spec.train.seq_len,
                          batch_size=spec.train.batch_size, seed=0, shuffle=False,
                          repeat=False, data_dir=spec.data_dir)
  out = [next(it)['inputs'] for _ in range(batches)]
  it.close()
  return np.concatenate(out)


# -------------------------------------------------------------------- numbers

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


# -------------------------------------------------------------------- reports

def provenance(seeds, source: str | None = 'stdlib') -> dict:
  """What a reader needs to rerun a table: command, revision, library hash, machine,
  data (source None: no corpus, e.g. a benchmark on random tokens) and seeds."""
  meta = {
      'command': ' '.join(['python', os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)] +
                          sys.argv[1:]),
      **code_version(),
      'date': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
      'machine': f'{platform.machine()}, {os.cpu_count()} CPU cores',
      'devices': f'{jax.device_count()} x {jax.devices()[0].platform}',
      'jax': jax.__version__,
  }
  if source is not None:
    info = data.prepare(source, None, verbose=False)
    meta['corpus'] = {'source': info['source'], 'fingerprint': info.get('fingerprint')}
  return meta | {'seeds': list(seeds)}


def header(title: str, meta: dict) -> str:
  """'# title' and one line of provenance, for the top of every markdown table."""
  corpus = ''
  if 'corpus' in meta:
    fp = meta['corpus']['fingerprint'] or {}
    fp_text = ', '.join(f'{k} {v}' for k, v in fp.items()) if isinstance(fp, dict) else fp
    corpus = f'; corpus {meta["corpus"]["source"]} ({fp_text})'
  return (f'# {title}\n\n`{meta["command"]}` at git {meta["git_rev"]} (library sha256 '
          f'{meta["library_sha256"][:12]}), {meta["date"]}; {meta["machine"]}, '
          f'{meta["devices"]}, jax {meta["jax"]}{corpus}; seeds {meta["seeds"]}.\n\n')


def write_json(path: pathlib.Path, meta: dict, **fields) -> None:
  """{'meta': provenance, **fields} as JSON: provenance first."""
  pathlib.Path(path).write_text(json.dumps({'meta': meta, **fields}, indent=1, default=float))


def write_results(stem: str, markdown: str, rows: list[dict], meta: dict,
                  out_dir: pathlib.Path = RESULTS) -> pathlib.Path:
  """<stem>.md (the markdown as given), .csv (rows) and .json (meta + rows)."""
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / f'{stem}.md').write_text(markdown)
  write_json(out_dir / f'{stem}.json', meta, rows=rows)
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


def verdict(claim: str, holds: bool, evidence: str) -> str:
  """One line saying whether a published trend holds in this run, with the numbers."""
  return f"- {claim}: **{'holds' if holds else 'does not hold'}** here ({evidence}).\n"


def report(stem: str, args, title: str, meta: dict, rows: list[dict], body: str,
           verdicts=(), footer: str = '') -> pathlib.Path:
  """A study's report: header, body (preamble and tables), the (claim, holds, evidence)
  verdicts under '## Trends', footer. Written to <args.out>/<stem>_<args.preset>.{md,csv,
  json} and printed; returns the .md path."""
  md = header(title, meta) + body
  if verdicts:
    md += '\n## Trends\n\n' + ''.join(verdict(*v) for v in verdicts)
  md += footer
  path = write_results(f'{stem}_{args.preset}', md, rows, meta, args.out)
  print(md)
  return path


def describe(c) -> str:
  """'200 steps of 16x128 bytes, d_model 128, 4 layers' for a table's preamble."""
  return (f'{c.train.steps} steps of {c.train.batch_size}x{c.train.seq_len} bytes, d_model '
          f'{c.model.d_model}, {c.model.num_layers} layers')


def study_args(doc: str, argv=None) -> argparse.Namespace:
  """--preset, --out and --runs of a study script (doc: its docstring)."""
  ap = argparse.ArgumentParser(description=doc.splitlines()[0])
  ap.add_argument('--preset', choices=sorted(SIZES), default='quick',
                  help="sizes and budget ('smoke' is for the tests)")
  ap.add_argument('--out', type=pathlib.Path, default=RESULTS, help='results folder')
  ap.add_argument('--runs', type=pathlib.Path, default=RUNS,
                  help='workdirs (checkpoints resume after a crash)')
  return ap.parse_args(argv)
