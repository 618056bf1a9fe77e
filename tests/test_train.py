"""The training command: learning, exact resume, crash recovery, guards, config errors,
and 2 processes x 4 devices against 1 process x 8 devices."""
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from sparse_jax.training import checkpoint, loop
from sparse_jax.config import ConfigError, load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ROOT / 'configs' / 'tiny.py'


def _config(data_dir, mesh=None, **train):
  c = load_config(TINY)
  c.data.data_dir = data_dir
  c.train.update(**train)
  c.mesh.update(**(mesh or {}))
  return c


def _rows(workdir, split=None):
  rows = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return [r for r in rows if r.get('split') == split]


def _cli(workdir, data_dir, *flags, cpu_devices=8, **popen):
  cmd = [sys.executable, '-m', 'sparse_jax.train', f'--config={TINY}',
         f'--workdir={workdir}', f'--config.data.data_dir={data_dir}',
         f'--cpu_devices={cpu_devices}', *flags]
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, **popen)


def _params(workdir, step):
  state = ocp.StandardCheckpointer().restore(workdir / 'checkpoints' / str(step) / 'state')
  return {k: np.asarray(v) for k, v in _flatten(state)}


def _flatten(tree, prefix=()):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _flatten(v, prefix + (k,))
  else:
    yield prefix, tree


@pytest.mark.parametrize('num_experts', [0, 4])
def test_loss_falls_dense_and_switch(tmp_path, data_dir, num_experts):
  c = _config(data_dir, steps=40, eval_every=40, checkpoint_every=40)
  c.moe.num_experts = num_experts
  assert loop.train(c, tmp_path) == 0
  train = _rows(tmp_path)
  first, last = np.mean([r['loss'] for r in train[:3]]), np.mean([r['loss'] for r in train[-3:]])
  # From ~ln(256) = 5.5 nats at init; 40 small steps must cut it clearly.
  assert first > 5.0 and last < first - 1.0, (first, last)
  ev = _rows(tmp_path, 'validation')[-1]
  assert ev['step'] == 40 and ev['loss'] < first - 1.0
  assert abs(ev['bpb'] - ev['loss'] / np.log(2)) < 1e-9
  assert ('dropped_fraction' in train[-1]) == (num_experts > 0)


def test_upcycling_from_a_dense_run_starts_at_its_loss(tmp_path, data_dir):
  dense = _config(data_dir, steps=10)
  dense.moe.num_experts = 0
  assert loop.train(dense, tmp_path / 'dense') == 0
  dense_loss = _rows(tmp_path / 'dense', 'validation')[-1]['loss']
  # Renormalised top-1 with room for every token: the upcycled model is the dense function;
  # one step at a negligible learning rate keeps it there until the evaluation.
  moe = _config(data_dir, steps=1, lr=1e-12, warmup_steps=0, eval_every=1)
  moe.moe.update(normalize_weights=True, capacity_factor=4.0)
  moe.init.upcycle_from = str(tmp_path / 'dense')
  assert loop.train(moe, tmp_path / 'moe') == 0
  ev = _rows(tmp_path / 'moe', 'validation')[-1]
  assert abs(ev['loss'] - dense_loss) < 1e-4, (ev['loss'], dense_loss)
  assert _rows(tmp_path / 'moe')[-1]['dropped_fraction'] == 0


@pytest.mark.slow
def test_pruning_in_training_logs_sparsity_and_resumes_with_masks(tmp_path, data_dir):
  c = _config(data_dir, steps=20, checkpoint_every=10, eval_every=20)
  c.pruning.update(sparsity=0.5, start_step=0, end_step=10, update_every=5)
  assert loop.train(c, tmp_path) == 0
  rows = _rows(tmp_path)
  pruned = [k for k in rows[-1] if k.startswith('sparsity/')]
  # FFN and attention kernels of both blocks (experts included), never embeddings/router.
  assert len(pruned) >= 8 and not any('embed' in k or 'router' in k for k in pruned)
  assert all(abs(rows[-1][k] - 0.5) < 1e-3 for k in pruned)          # round(s * size) zeros
  assert rows[0]['nonzero_params'] > rows[-1]['nonzero_params']
  # Resuming restores the masks with the optimizer state: nothing grows back.
  c.train.steps = 30
  assert loop.train(c, tmp_path) == 0
  rows = _rows(tmp_path)
  assert [r['step'] for r in rows] == list(range(1, 31))
  assert rows[-1]['nonzero_params'] == rows[19]['nonzero_params']


def test_resume_reproduces_uninterrupted_run(tmp_path, data_dir):
  """Same mesh: exactly. Another mesh (expert axis 4, FSDP over the data axis): to
  float32 reduction-order noise. A changed model or global batch is refused."""
  straight, split, mid = tmp_path / 'straight', tmp_path / 'split', tmp_path / 'mid'
  run = lambda steps, d, **mesh: loop.train(_config(
      data_dir, steps=steps, lr_decay_steps=20, checkpoint_every=5, mesh=mesh), d)
  assert run(20, straight) == 0
  assert run(10, split) == 0 and run(20, split, expert=4, fsdp=True) == 0
  # Also from a checkpoint written asynchronously in the middle of a run.
  (mid / 'checkpoints').mkdir(parents=True)
  shutil.copytree(straight / 'checkpoints' / '10', mid / 'checkpoints' / '10')
  assert run(20, mid) == 0
  a = _rows(straight)
  for other, exact in ((mid, True), (split, False)):
    b = _rows(other)
    assert [r['step'] for r in b] == list(range(1 if other == split else 11, 21))
    same = (np.testing.assert_array_equal if exact else
            lambda x, y, **kw: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, **kw))
    same([r['loss'] for r in b], [r['loss'] for r in a[-len(b):]])
    same(_rows(other, 'validation')[-1]['loss'], _rows(straight, 'validation')[-1]['loss'])
    pa, pb = _params(straight, 20), _params(other, 20)
    assert pa.keys() == pb.keys() and len(pa) > 10
    for k in pa:
      same(pb[k], pa[k], err_msg=str(k))
  # The first row a run writes reports its memory; mesh 2 x 4 with FSDP holds at most
  # half of the state per device (everything split over 'data' of 2, experts over 4).
  first = lambda rows, step: next(r for r in rows if r['step'] == step)
  full = first(a, 1)['state_bytes_per_device']
  assert first(a, 1)['compiled_temp_bytes'] > 0
  assert first(_rows(split), 11)['state_bytes_per_device'] < 0.5 * full
  # Refused before anything is compiled or written; the checkpoints stay as they were.
  before = sorted(p.name for p in (split / 'checkpoints').iterdir())
  for key, value, words in [('model', {'d_model': 64}, ['model.d_model=64', '32']),
                            ('train', {'batch_size': 16}, ['train.batch_size=16', '8'])]:
    c = _config(data_dir, steps=30)
    c[key].update(**value)
    with pytest.raises(ConfigError) as e:
      loop.train(c, split)
    assert all(w in str(e.value) for w in words) and 'checkpoint' in str(e.value)
  assert sorted(p.name for p in (split / 'checkpoints').iterdir()) == before


@pytest.mark.slow
def test_sigkill_after_first_checkpoint_resumes_and_finishes(tmp_path, data_dir):
  flags = ['--config.train.steps=30', '--config.train.checkpoint_every=5',
           '--config.train.eval_every=30']
  p = _cli(tmp_path, data_dir, *flags)
  deadline = time.time() + 240
  while not (tmp_path / 'checkpoints' / '5').exists():     # orbax renames when complete
    assert p.poll() is None and time.time() < deadline, p.communicate()
    time.sleep(0.2)
  p.send_signal(signal.SIGKILL)
  p.wait()
  p = _cli(tmp_path, data_dir, *flags)
  out, err = p.communicate(timeout=300)
  assert p.returncode == 0, err
  assert 'resumed from step' in out
  steps = [r['step'] for r in _rows(tmp_path)]
  assert steps == list(range(1, 31))                       # no gap, no duplicate


class _Bar:
  """A stand-in progress bar that sends this process SIGTERM after `at` steps."""

  def __init__(self, at):
    self.at, self.n = at, 0

  def update(self, n):
    self.n += n
    if self.n == self.at:
      os.kill(os.getpid(), signal.SIGTERM)

  def set_postfix(self, **_):
    pass

  def write(self, text):
    print(text)


def test_sigterm_saves_then_exits_and_restores_the_handler(tmp_path, data_dir, capsys):
  before = signal.getsignal(signal.SIGTERM)
  c = _config(data_dir, steps=2000, checkpoint_every=1000, eval_every=2000)
  assert loop.train(c, tmp_path, progress=_Bar(at=7)) == 0
  assert 'SIGTERM: saved step 7;' in capsys.readouterr().out
  assert (tmp_path / 'checkpoints' / '7').exists() and _rows(tmp_path)[-1]['step'] == 7
  assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.slow
def test_profile_trace_is_written(tmp_path, data_dir):
  c = _config(data_dir, steps=4, eval_every=4, checkpoint_every=4)
  c.profile_steps = 2
  assert loop.train(c, tmp_path) == 0
  assert list((tmp_path / 'profile').rglob('*.xplane.pb'))


def test_nan_guard_stops_and_keeps_last_good_checkpoint(tmp_path, data_dir, capsys):
  c = _config(data_dir, lr=1e30, warmup_steps=0, checkpoint_every=1, steps=10)
  assert loop.train(c, tmp_path) == 1
  # (the progress bar shares stderr, without a newline)
  line = [l[l.index('error:'):] for l in capsys.readouterr().err.splitlines() if 'error:' in l]
  assert len(line) == 1 and 'loss is' in line[0] and 'last good checkpoint is step' in line[0]
  bad = int(line[0].split(' at step ')[1].split(';')[0])
  saved = sorted(int(d.name) for d in (tmp_path / 'checkpoints').iterdir() if d.name.isdigit())
  assert saved and max(saved) == bad - 1
  assert f'last good checkpoint is step {bad - 1} ' in line[0]
  assert checkpoint.Checkpoints(tmp_path).verified(bad - 1)      # named only once verified


# Only what a subprocess can show: flag parsing and exit codes (validate() itself is
# tested in process, tests/test_config.py).
@pytest.mark.parametrize('flag,words', [
    ('--config.mesh.data=3', ['8 devices']),
    ('--config.train.steps=abc', ['abc']),
    ('--config.nonexistent=1', ['nonexistent', 'base_config']),
    ('--config=configs/nope.py', ['configs/nope.py']),
    (('--config.mesh.fsdp=True', '--config.model.d_model=36'),
     ['mesh.fsdp=True', 'blocks.0.attn.wk', 'data axis size 8']),
])
def test_config_errors_exit_2_with_one_line(tmp_path, data_dir, flag, words):
  p = _cli(tmp_path, data_dir, *((flag,) if isinstance(flag, str) else flag))
  out, err = p.communicate(timeout=120)
  assert p.returncode == 2, (out, err)
  lines = [l for l in err.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith('error:'), err
  for w in words:
    assert w in lines[0], (w, lines[0])


@pytest.mark.slow
def test_resume_on_other_device_counts_and_meshes(tmp_path, data_dir):
  """10 steps on 8 devices with expert axis 8, then resumed to 20 on 4 devices with
  expert axis 4, and (from the same checkpoint) on 8 devices with data axis 8 and FSDP:
  both equal the uninterrupted run. group_size fixes the routing groups (one sequence)
  whatever the number of sequences per device."""
  model = ['--config.moe.num_experts=8', '--config.moe.group_size=32',
           '--config.train.checkpoint_every=10', '--config.train.eval_every=20',
           '--config.train.lr_decay_steps=20']
  run = lambda d, steps, *mesh, devices=8: _cli(
      d, data_dir, *model, f'--config.train.steps={steps}', *mesh, cpu_devices=devices)
  ep8 = ['--config.mesh.data=1', '--config.mesh.expert=8']
  jobs = {'straight': run(tmp_path / 'straight', 20, *ep8),
          'first': run(tmp_path / 'four', 10, *ep8)}
  for p in jobs.values():
    assert p.wait(timeout=300) == 0, p.communicate()
  shutil.copytree(tmp_path / 'four', tmp_path / 'fsdp')
  for d, mesh, devices in [('four', ['--config.mesh.data=1', '--config.mesh.expert=4'], 4),
                           ('fsdp', ['--config.mesh.data=8', '--config.mesh.fsdp=True'], 8)]:
    p = run(tmp_path / d, 20, *mesh, devices=devices)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0 and 'resumed from step 10' in out, err
    a, b = _rows(tmp_path / 'straight'), _rows(tmp_path / d)
    assert [r['step'] for r in b] == list(range(1, 21))
    np.testing.assert_allclose([r['loss'] for r in b], [r['loss'] for r in a], rtol=1e-5)
    np.testing.assert_allclose([r['max_violation'] for r in b],
                               [r['max_violation'] for r in a], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_two_processes_reproduce_one_process(tmp_path, data_dir):
  """2 processes x 4 devices with FSDP over the 8 data shards = 1 process x 8 without."""
  flags = ['--config.train.steps=6', '--config.train.eval_every=6', '--config.mesh.fsdp=True']
  assert loop.train(_config(data_dir, steps=6, eval_every=6), tmp_path / 'one') == 0
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  procs = [_cli(tmp_path / 'two', data_dir, *flags, f'--coordinator_address=127.0.0.1:{port}',
                '--num_processes=2', f'--process_id={i}', cpu_devices=4) for i in range(2)]
  for p in procs:
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
  a, b = _rows(tmp_path / 'one'), _rows(tmp_path / 'two')
  assert [r['step'] for r in b] == list(range(1, 7))
  np.testing.assert_allclose([r['loss'] for r in b], [r['loss'] for r in a], rtol=1e-5)
  assert (tmp_path / 'two' / 'checkpoints' / '6').exists()
