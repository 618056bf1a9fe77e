"""Re-runs, as a user would, the faults that once lost trained work or gave silent wrong
results, and tabulates for each: exit code (or exception), stderr lines, the message, and
what survived. Needs root for the tmpfs cases (skipped otherwise).

  python experiments/fault_cases.py [--out experiments/results]

Writes <out>/fault_cases.md and .json. Each case is also a test (tests/test_faults_*.py);
this script is the report of them end to end through the command lines.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_jax import sharding
from sparse_jax.config import load_config, resolve
from sparse_jax.data import hashing
from sparse_jax.models import TransformerLM
from sparse_jax.pruning import compaction, oneshot
from sparse_jax.training import checkpoint

import common

ROOT = common.ROOT
TINY = ROOT / 'configs' / 'tiny.py'


def _lines(stderr: str) -> list[str]:
  """stderr's lines as a terminal shows them (a progress bar's redraws are one line, and
  a line that ends as a bar is not a message)."""
  out = []
  for raw in stderr.splitlines():
    seen = raw.split('\r')[-1].strip()
    for word in ('error:', 'warning:', 'note:'):     # a message printed after a bar
      if word in seen:
        seen = seen[seen.index(word):]
        break
    else:
      if '|' in seen and ('step/s' in seen or 's/step' in seen):
        continue
    if seen:
      out.append(seen)
  return out


def run(module: str, *args, wait=True, **popen):
  cmd = [sys.executable, '-m', f'sparse_jax.{module}', *map(str, args)]
  if not wait:
    return subprocess.Popen(cmd, cwd=ROOT, env=common.cpu_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)
  r = subprocess.run(cmd, cwd=ROOT, env=common.cpu_env(), capture_output=True, text=True,
                     timeout=600)
  return r.returncode, _lines(r.stderr)


def train(workdir, *flags, config=TINY):
  return run('train', f'--config={config}', f'--workdir={workdir}', *flags)


def snapshot(d: pathlib.Path) -> str:
  """sha256 over every file's path and bytes (the lock file aside)."""
  h = hashlib.sha256()
  for p in sorted(d.rglob('*')):
    if p.is_file() and p.name != 'trainer.lock':
      h.update(p.relative_to(d).as_posix().encode() + p.read_bytes())
  return h.hexdigest()


def steps_of(workdir) -> str:
  names = sorted(p.name for p in (pathlib.Path(workdir) / 'checkpoints').iterdir())
  return ', '.join(names) or 'none'


def mount(path: pathlib.Path, size: str):
  path.mkdir(parents=True, exist_ok=True)
  subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)], check=True)


def umount(path: pathlib.Path):
  subprocess.run(['umount', str(path)], check=False)


def caught(fn) -> tuple[str, list[str]]:
  try:
    fn()
  except Exception as e:  # pylint: disable=broad-except
    return type(e).__name__, str(e).splitlines()
  return 'no error', []


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--out', default=str(common.RESULTS))
  args = ap.parse_args()
  common.setup_devices(8)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix='fault_cases_'))
  rows = []

  def case(n, name, outcome, lines, survived):
    rows.append({'case': n, 'fault': name, 'outcome': outcome, 'stderr_lines': len(lines),
                 'message': lines[-1] if lines else '', 'survived': survived})
    print(f'{n}. {name}: {outcome}, {len(lines)} line(s); {survived}', flush=True)

  base = tmp / 'base'
  train(base, '--config.train.steps=10', '--config.train.checkpoint_every=5')

  # 1. resume with a pruner turned on; a compress output resumed with the original config
  before = snapshot(base)
  rc, lines = train(base, '--config.train.steps=15', '--config.pruning.sparsity=0.5')
  case(1, 'resume with --config.pruning.sparsity=0.5 added', f'exit {rc}', lines,
       f'checkpoints {steps_of(base)}; workdir byte-identical: {snapshot(base) == before}')
  comp = tmp / 'comp'
  run('compress', f'--workdir={base}', f'--out={comp}', '--method=magnitude', '--sparsity=0.5',
      '--cpu_devices=8')
  before = snapshot(comp)
  rc, lines = train(comp, '--config.train.steps=15')
  case(1, 'a compress output resumed with the original config', f'exit {rc}', lines,
       f'checkpoints {steps_of(comp)}; workdir byte-identical: {snapshot(comp) == before}')

  # 2. full disks under tb/ and under metrics.jsonl
  if os.geteuid() == 0:
    w = tmp / 'tbfull'
    mount(w / 'tb', '16k')
    start = time.monotonic()
    rc, lines = train(w, '--config.train.steps=400', '--config.train.checkpoint_every=5')
    took = time.monotonic() - start
    umount(w / 'tb')
    good = checkpoint.Checkpoints(w).newest_verified()
    case(2, 'a full disk under tb/', f'exit {rc} after {took:.0f} s', lines,
         f'newest verified checkpoint: step {good}')
    w = tmp / 'mfull'
    mount(w, '32m')
    mount(w / 'tb', '4m')
    p = run('train', f'--config={TINY}', f'--workdir={w}', '--config.train.steps=100000',
            '--config.train.checkpoint_every=200', '--config.train.eval_every=100000',
            wait=False)
    while not (w / 'checkpoints' / '200' / 'digests.json').exists() and p.poll() is None:
      time.sleep(0.01)
    st = os.statvfs(w)
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    subprocess.run(['mount', '-o', f'remount,size={-(-used // 4096) * 4}k', str(w)], check=True)
    _, err = p.communicate(timeout=600)
    good = checkpoint.Checkpoints(w).newest_verified()
    umount(w / 'tb')
    umount(w)
    case(2, 'a full disk under metrics.jsonl', f'exit {p.returncode}', _lines(err),
         f'newest verified checkpoint: step {good}')

  # 3. compress what the project writes: a compressed output, pruned runs
  rc, lines = run('compress', f'--workdir={comp}', f'--out={tmp / "comp2"}', '--method=experts',
                  '--keep=2', '--cpu_devices=8')
  rc2, _ = train(tmp / 'comp2', '--config.train.steps=14',
                 config=tmp / 'comp2' / 'config.py') if rc == 0 else (None, [])
  case(3, 'compress a compressed workdir (magnitude 50%, then --keep=2 experts)', f'exit {rc}',
       lines, f'its fine-tune exits {rc2}')
  for schedule in ('gmp', 'dynamic'):
    src = tmp / schedule
    train(src, '--config.train.steps=8', '--config.train.checkpoint_every=8',
          '--config.pruning.sparsity=0.5', f'--config.pruning.schedule={schedule}',
          '--config.pruning.end_step=6', '--config.pruning.update_every=2')
    rc, lines = run('compress', f'--workdir={src}', f'--out={tmp / (schedule + "_e")}',
                    '--method=experts', '--keep=2', '--cpu_devices=8')
    case(3, f'compress a run trained with {schedule} pruning', f'exit {rc}', lines,
         'output written' if (tmp / (schedule + '_e') / 'compress.json').exists() else '-')

  # 4. compaction's kept indices
  c = load_config(TINY)
  c.moe.num_experts = 0
  spec = resolve(c, 1).model
  state = nnx.state(TransformerLM(spec, rngs=nnx.Rngs(0)))
  for kept in ([0, 999], [3, 3], []):
    kind, lines = caught(lambda: compaction.compact(
        spec, state, {('blocks', i, 'ffn'): kept for i in range(spec.num_layers)}))
    case(4, f'compact() with kept FFN neurons {kept}', kind, lines, 'no model built')

  # 5. non-finite numbers in pruning
  w = jax.random.normal(jax.random.key(0), (16, 8))
  x = jax.random.normal(jax.random.key(1), (32, 16))
  kind, lines = caught(lambda: oneshot.sparsegpt(w, x.at[0, 0].set(jnp.nan), sparsity=0.5))
  case(5, 'sparsegpt with a NaN calibration input', kind, lines, 'no weights returned')
  kind, lines = caught(lambda: oneshot.magnitude(w.at[0, 0].set(jnp.nan), sparsity=0.5))
  case(5, 'magnitude pruning of a kernel with a NaN weight', kind, lines, 'no mask returned')

  # 6. upcycling from the wrong source
  rc, lines = train(tmp / 'up1', f'--config.init.upcycle_from={base}')
  case(6, 'upcycle from an MoE workdir', f'exit {rc}', lines, 'nothing trained')
  dense = tmp / 'dense48'
  train(dense, '--config.moe.num_experts=0', '--config.model.d_ff=48', '--config.train.steps=2',
        '--config.train.checkpoint_every=2', '--config.train.eval_every=2')
  rc, lines = train(tmp / 'up2', f'--config.init.upcycle_from={dense}')
  case(6, 'upcycle from a dense run of another width', f'exit {rc}', lines, 'nothing trained')

  # 7. compress output handling
  (tmp / 'afile').write_text('')
  rc, lines = run('compress', f'--workdir={base}', f'--out={tmp / "afile"}', '--method=wanda',
                  '--sparsity=0.5')
  case(7, '--out= an existing file', f'exit {rc}', lines, 'the file unchanged: '
       f'{(tmp / "afile").read_text() == ""}')
  dst, work = tmp / 'killed', tmp / '.killed.incomplete'
  p = run('compress', f'--workdir={base}', f'--out={dst}', '--method=magnitude',
          '--sparsity=0.5', '--cpu_devices=8', wait=False)
  while not (work / 'checkpoints').exists() and p.poll() is None:
    time.sleep(0.01)
  p.kill()
  p.wait()
  left = dst.exists()
  rc, lines = run('compress', f'--workdir={base}', f'--out={dst}', '--method=magnitude',
                  '--sparsity=0.5', '--cpu_devices=8')
  case(7, 'compress killed mid-write, then rerun', f'DST after the kill: {left}; rerun exit {rc}',
       lines, f'DST complete: {(dst / "compress.json").exists()}, partial dir left: '
       f'{work.exists()}')

  # 8. messages
  ep = tmp / 'ep'
  train(ep, '--cpu_devices=8', '--config.mesh.data=2', '--config.mesh.expert=4',
        '--config.train.steps=2', '--config.train.checkpoint_every=2',
        '--config.train.eval_every=2')
  rc, lines = run('compress', f'--workdir={ep}', f'--out={tmp / "ep_c"}', '--method=magnitude',
                  '--sparsity=0.5', '--cpu_devices=1')
  case(8, 'compress an 8-device expert-parallel run on 1 device', f'exit {rc}', lines,
       'source unchanged')
  name = next(f'doc{i}.txt' for i in range(1000) if hashing.split_of(f'doc{i}.txt') ==
              'validation')
  (tmp / 'texts').mkdir()
  (tmp / 'texts' / name).write_text('abcdef')
  rc, lines = train(tmp / 'six', f'--config.data.source=files:{tmp}/texts/*.txt')
  case(8, 'one 6-byte data file (it falls in validation)', f'exit {rc}', lines, '-')
  kind, lines = caught(lambda: sharding.put_batch(np.zeros((3, 4), np.int32),
                                                  sharding.make_mesh(2, 4, 1)))
  case(8, 'sharding.put_batch of 3 rows on 8 shards', kind, lines, '-')

  meta = common.provenance([0], source='stdlib')
  out = pathlib.Path(args.out)
  md = common.header('Fault cases, re-run end to end', meta) + common.table(
      ['#', 'fault', 'outcome', 'stderr lines', 'message', 'what survived'],
      [[r['case'], r['fault'], r['outcome'], r['stderr_lines'],
        r['message'].replace('|', '\\|'), r['survived']] for r in rows])
  common.write_results('fault_cases', md, rows, meta, out_dir=out)
  shutil.rmtree(tmp, ignore_errors=True)
  print(f'wrote {out / "fault_cases.md"}')


if __name__ == '__main__':
  main()
