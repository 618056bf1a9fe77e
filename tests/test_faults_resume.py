"""Faults that could lose trained work: a resume whose config does not fit its checkpoint,
a full disk under metrics.jsonl or tb/, upcycling from the wrong source, data that all
falls in one split, a batch that cannot be split over the mesh. Each test causes the
fault and asserts one line, the documented exit, and what survived."""
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from sparse_jax import digests, sharding
from sparse_jax.config import ConfigError, load_config
from sparse_jax.data import hashing
from sparse_jax.training import checkpoint, loop, metrics
from sparse_jax.training.steps import build
from test_faults import _errors, _mount_tmpfs

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ROOT / 'configs' / 'tiny.py'


def _config(data_dir, **train):
  c = load_config(TINY)
  c.data.data_dir = data_dir
  c.train.update(**{'steps': 10, 'checkpoint_every': 5, 'eval_every': 10, **train})
  return c


@pytest.fixture(scope='module')
def run10(data_dir, tmp_path_factory):
  """A 10-step tiny switch run with checkpoints 5 and 10."""
  workdir = tmp_path_factory.mktemp('run10')
  assert loop.train(_config(data_dir), workdir) == 0
  return workdir


def _snapshot(d):
  return sorted((p.relative_to(d).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
                for p in pathlib.Path(d).rglob('*') if p.name != 'trainer.lock')


# --- a resume that does not fit --------------------------------------------------------

def test_turning_on_a_pruner_on_resume_is_refused_and_nothing_moves(run10, data_dir, tmp_path):
  shutil.copytree(run10, tmp_path / 'w')
  before = _snapshot(tmp_path / 'w')
  c = _config(data_dir, steps=15)
  c.pruning.sparsity = 0.5
  with pytest.raises(ConfigError, match=r"pruning.sparsity=0.5 differs from the checkpoint .*"
                                        r"\(step 10\).*sparse_jax.compress"):
    loop.train(c, tmp_path / 'w')
  assert _snapshot(tmp_path / 'w') == before            # no N.corrupt, history intact


def test_a_sound_checkpoint_of_another_structure_is_refused_not_moved(run10, data_dir, tmp_path):
  """Whatever check_resume misses: the structure is compared before anything is read."""
  shutil.copytree(run10, tmp_path / 'w')
  before = _snapshot(tmp_path / 'w')
  c = _config(data_dir)
  c.pruning.sparsity = 0.5
  spec = loop.resolve(c, jax.device_count())
  steps = build(spec, loop.make_mesh(spec))
  ckpts = checkpoint.Checkpoints(tmp_path / 'w', keep=3)       # a writer: it could move steps
  with pytest.raises(checkpoint.StructureError,
                     match=r'checkpoint step 10 .* holds another model or optimizer state .*'
                           r'\(optimizer/opt_state/'):
    ckpts.newest(lambda s: ckpts.restore(s, steps.state, steps.shardings))
  ckpts.close()
  assert _snapshot(tmp_path / 'w') == before


def test_structure_difference_names_the_first_difference():
  diff = checkpoint.structure_difference
  assert diff({'a': (2,), 'b': (3,)}, {'a': (2,), 'b': (3,)}) is None
  assert diff({'a': (2,)}, {'a': (2,), 'c': (1,)}) == ('c is in the checkpoint but not in '
                                                       'the state this command builds')
  assert diff({'a': (2,), 'b': (1,)}, {'a': (2,)}).startswith('b is in the state this command')
  assert diff({'a': (2, 4)}, {'a': (2, 8)}) == ('a has shape (2, 8) in the checkpoint but '
                                                '(2, 4) here')


def test_resumed_metrics_rows_are_moved_aside_never_deleted(tmp_path, capsys):
  rows = [json.dumps({'step': s, 'loss': float(s)}) for s in (1, 2, 3, 4, 5)]
  (tmp_path / 'metrics.jsonl').write_text('\n'.join(rows) + '\n{"step": 6, "lo')
  metrics.MetricsWriter(tmp_path, resume_step=3).close()
  kept = (tmp_path / 'metrics.jsonl').read_text().splitlines()
  moved = (tmp_path / metrics.SUPERSEDED).read_text().splitlines()
  assert kept == rows[:3] and moved == rows[3:] + ['{"step": 6, "lo']
  assert 'moved to metrics.superseded.jsonl' in capsys.readouterr().err
  metrics.MetricsWriter(tmp_path, resume_step=None).close()   # a fresh start moves them all
  assert (tmp_path / 'metrics.jsonl').read_text() == ''
  assert (tmp_path / metrics.SUPERSEDED).read_text().splitlines() == moved + rows[:3]


# --- write failures: one line, exit 1, never a hang -----------------------------------

def _train_cli(workdir, data_dir, *flags):
  cmd = [sys.executable, '-m', 'sparse_jax.train', f'--config={TINY}', f'--workdir={workdir}',
         f'--config.data.data_dir={data_dir}', *flags]
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a_full_disk_under_tb_ends_the_run_in_one_line(data_dir, tmp_path):
  """tensorboardX's writer thread used to die here and leave add_scalar blocked forever;
  a subprocess with a timeout turns a hang into a failure."""
  workdir = tmp_path / 'run'
  workdir.mkdir()
  _mount_tmpfs(workdir / 'tb', '16k')
  try:
    start = time.monotonic()
    r = _train_cli(workdir, data_dir, '--config.train.steps=400',
                   '--config.train.checkpoint_every=5', '--config.train.eval_every=1000')
    assert r.returncode == 1, r.stderr
    (line,) = _errors(r.stderr)
    assert line.startswith(f'error: writing {workdir / "tb"}') and 'No space left' in line
    good = int(line.split('newest verified checkpoint is step ')[1].split()[0])
    assert good >= 5 and checkpoint.Checkpoints(workdir).verified(good)
    assert time.monotonic() - start < 200
  finally:
    subprocess.run(['umount', str(workdir / 'tb')], check=False)


class _FillAfter:
  """A progress bar that, once checkpoint 30 has its manifest, shrinks the workdir's tmpfs
  to what it uses: metrics.jsonl then fills the slack of its last page and fails, long
  before the next save (step 60). Steps last 0.05 s, so the check does not depend on load."""

  def __init__(self, workdir):
    self.workdir, self.n, self.full = workdir, 0, False

  def update(self, n):
    self.n += n
    manifest = self.workdir / 'checkpoints' / '30' / digests.MANIFEST
    if not self.full and manifest.exists():
      st = os.statvfs(self.workdir)
      used = (st.f_blocks - st.f_bfree) * st.f_frsize
      subprocess.run(['mount', '-o', f'remount,size={-(-used // 4096) * 4}k',
                      str(self.workdir)], check=True)
      self.full = True
    time.sleep(0.05)

  def set_postfix(self, **_):
    pass

  def write(self, text):
    print(text)


@pytest.mark.slow
def test_a_full_disk_under_metrics_ends_the_run_in_one_line(data_dir, tmp_path, capsys):
  workdir = tmp_path / 'run'
  _mount_tmpfs(workdir, '32m')
  _mount_tmpfs(workdir / 'tb', '4m')                  # events have room: metrics fail first
  try:
    c = _config(data_dir, steps=1000, checkpoint_every=30, eval_every=1000)
    bar = _FillAfter(workdir)
    assert loop.train(c, workdir, progress=bar) == 1
    (line,) = _errors(capsys.readouterr().err)
    assert line.startswith(f'error: writing {workdir / "metrics.jsonl"} failed: No space')
    assert 'newest verified checkpoint is step 30' in line
    assert checkpoint.Checkpoints(workdir).verified(30) and bar.n < 60
  finally:
    subprocess.run(['umount', str(workdir / 'tb')], check=False)
    subprocess.run(['umount', str(workdir)], check=False)


# --- upcycling from the wrong source ---------------------------------------------------

@pytest.mark.slow
def test_upcycling_from_an_moe_workdir_exits_2_in_one_line(run10, data_dir, tmp_path):
  r = _train_cli(tmp_path / 'up', data_dir, f'--config.init.upcycle_from={run10}')
  assert r.returncode == 2, r.stderr
  (line,) = [l for l in r.stderr.splitlines() if l.strip()]
  assert line.startswith(f'error: init.upcycle_from={run10}: upcycle() needs a dense model')


@pytest.mark.slow
def test_upcycling_from_a_dense_run_of_another_width_is_refused(data_dir, tmp_path):
  dense = _config(data_dir, steps=2, checkpoint_every=2, eval_every=2)
  dense.moe.num_experts = 0
  dense.model.d_ff = 48
  assert loop.train(dense, tmp_path / 'dense') == 0
  c = _config(data_dir)
  c.init.upcycle_from = str(tmp_path / 'dense')
  with pytest.raises(ConfigError, match=r'init.upcycle_from=.*expert width \(64\) must equal '
                                        r'the dense d_ff \(48\)'):
    loop.train(c, tmp_path / 'up')
  assert not list((tmp_path / 'up').glob('checkpoints/*')) and not list(
      (tmp_path / 'up').glob('metrics*'))


# --- data and batches ------------------------------------------------------------------

def test_data_that_all_falls_in_validation_is_named_so(tmp_path):
  name = next(f'doc{i}.txt' for i in range(1000) if hashing.split_of(f'doc{i}.txt') ==
              'validation')
  (tmp_path / 'texts').mkdir()
  (tmp_path / 'texts' / name).write_text('abcdef')
  c = _config('')
  c.data.source = f'files:{tmp_path}/texts/*.txt'
  with pytest.raises(loop.DataError, match=r'holds no text: all of its 6 bytes fall in the '
                                           r'validation split .*give more files'):
    loop.train(c, tmp_path / 'run')


def test_a_batch_that_cannot_be_split_over_the_mesh_is_named():
  mesh = sharding.make_mesh(2, 4, 1)
  with pytest.raises(ValueError, match=r'a batch of 3 rows cannot be split over the 8 '
                                       r"devices of the mesh axes \('data', 'expert'\)"):
    sharding.put_batch({'inputs': np.zeros((3, 4), np.int32)}, mesh)
  assert sharding.put_batch({'inputs': np.zeros((8, 4), np.int32)}, mesh)['inputs'].shape == (8, 4)
