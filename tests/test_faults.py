"""Fault injection: each test causes one way a run or a call can go wrong (a damaged or
lost checkpoint, a full disk, a second trainer, a cut-off metrics row, too little data, a
damaged corpus cache, a mistake on the command line, a non-finite or integer input, ...)
and asserts the promised behaviour: a correct continuation, or one line and a documented
exit code."""
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sparse_jax as sj
from sparse_jax import digests, layers, models, pruning
from sparse_jax.config import ConfigError, base_config, load_config, model_spec
from sparse_jax.training import checkpoint, loop

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ROOT / 'configs' / 'tiny.py'


def _config(data_dir, **train):
  c = load_config(TINY)
  c.data.data_dir = data_dir
  c.train.update(**train)
  return c


def _trace(workdir):
  rows = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return [(r['step'], r.get('split'), r['loss']) for r in rows]


def _errors(text):
  """The one-line messages in captured stderr (the progress bar shares it, no newline)."""
  return [l[l.index(w):] for l in text.splitlines() for w in ('error:', 'warning:') if w in l]


# --- checkpoints -------------------------------------------------------------------------

def _config15(data_dir):
  return _config(data_dir, steps=15, checkpoint_every=5, eval_every=15, keep_checkpoints=2)


@pytest.fixture(scope='module')
def straight(data_dir, tmp_path_factory):
  """An uninterrupted 15-step run; of its checkpoints 5, 10 and 15, rotation kept two."""
  workdir = tmp_path_factory.mktemp('straight')
  assert loop.train(_config15(data_dir), workdir) == 0
  ckpts = checkpoint.Checkpoints(workdir)
  assert ckpts.steps() == [15, 10] and ckpts.verified(15) and ckpts.verified(10)
  return workdir


def _latest(straight, workdir):
  """A copy of the straight run; its latest checkpoint, to damage."""
  shutil.copytree(straight, workdir, dirs_exist_ok=True)
  return workdir / 'checkpoints' / '15'


def _biggest_file(step_dir):
  return max((p for p in step_dir.rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)


def _flip(step_dir):
  p = _biggest_file(step_dir)
  raw = bytearray(p.read_bytes())
  mid = len(raw) // 2
  raw[mid:mid + 64] = bytes(b ^ 0xFF for b in raw[mid:mid + 64])
  p.write_bytes(bytes(raw))


def _lose(step_dir):
  (step_dir / 'state' / 'manifest.ocdbt').unlink()


def _truncate(step_dir):
  p = _biggest_file(step_dir)
  p.write_bytes(p.read_bytes()[:p.stat().st_size // 2])


def _empty(step_dir):
  shutil.rmtree(step_dir)
  step_dir.mkdir()


def _lose_undigested(step_dir):     # a step finalised, then killed before its manifest
  (step_dir / digests.MANIFEST).unlink()
  (step_dir / 'state' / '_METADATA').unlink()


def _lose_data_position(step_dir):
  shutil.rmtree(step_dir / 'data')


@pytest.mark.parametrize('damage,words', [(_flip, 'fails the digest of state/'),
                                          (_lose, 'lost its file state/manifest.ocdbt')])
def test_a_damaged_latest_checkpoint_falls_back_and_reproduces_the_trace(
    straight, data_dir, tmp_path, capsys, damage, words):
  damage(_latest(straight, tmp_path))
  capsys.readouterr()
  assert loop.train(_config15(data_dir), tmp_path) == 0
  out, err = capsys.readouterr()
  (line,) = _errors(err)
  assert line.startswith('warning: checkpoint step 15') and words in line
  assert '15.corrupt' in line and 'resumed from step 10' in out
  assert (tmp_path / 'checkpoints' / '15.corrupt').is_dir()      # kept for inspection
  assert _trace(tmp_path) == _trace(straight)
  assert checkpoint.Checkpoints(tmp_path).verified(15)


@pytest.mark.parametrize('damage,words', [
    (_truncate, 'has state/'), (_empty, 'is empty'),
    (_lose_undigested, 'cannot be read'), (_lose_data_position, 'lost its file data/')])
def test_a_reader_skips_a_damaged_checkpoint_and_changes_nothing(
    straight, tmp_path, capsys, damage, words):
  damage(_latest(straight, tmp_path))
  before = sorted((p.relative_to(tmp_path).as_posix(), p.stat().st_mtime_ns)
                  for p in tmp_path.rglob('*'))
  import jax
  from sparse_jax import sharding
  _, spec, model = checkpoint.load_model(tmp_path, sharding.make_mesh(1, 1, 1,
                                                                      devices=jax.devices()[:1]))
  (line,) = _errors(capsys.readouterr().err)
  assert 'checkpoint step 15' in line and words in line and 'skipped it' in line
  assert sorted((p.relative_to(tmp_path).as_posix(), p.stat().st_mtime_ns)
                for p in tmp_path.rglob('*')) == before
  assert spec.model.d_model == 32 and model is not None


def _mount_tmpfs(path, size, *options):
  path.mkdir()
  try:
    subprocess.run(['mount', '-t', 'tmpfs', '-o', ','.join((f'size={size}',) + options),
                    'tmpfs', str(path)], check=True, capture_output=True)
  except (OSError, subprocess.CalledProcessError) as e:
    pytest.skip(f'mounting a tmpfs needs root and mount(8): {e}')


class _FillDisk:
  """A progress bar that, once checkpoint 20 is finalised, shrinks the workdir's tmpfs to
  what is used plus 64 kB (room for its manifest; the next save cannot fit, whatever a
  checkpoint's size), and makes each step last 0.1 s (so a background save ends within a
  known number of steps whatever the machine's load)."""

  def __init__(self, workdir):
    self.workdir, self.n = workdir, 0

  def update(self, n):
    self.n += n
    if self.n == 21:
      deadline = time.time() + 60
      while not (self.workdir / 'checkpoints' / '20').exists():    # orbax's final rename
        assert time.time() < deadline
        time.sleep(0.05)
      st = os.statvfs(self.workdir)
      used = (st.f_blocks - st.f_bfree) * st.f_frsize
      subprocess.run(['mount', '-o', f'remount,size={used // 1024 + 64}k', str(self.workdir)],
                     check=True)
    time.sleep(0.1)

  def set_postfix(self, **_):
    pass

  def write(self, text):
    print(text)


def test_disk_full_during_a_save_exits_1_at_once_with_the_previous_checkpoint(
    data_dir, tmp_path, capsys):
  workdir = tmp_path / 'full'
  _mount_tmpfs(workdir, '32m')
  try:
    c = _config(data_dir, steps=200, checkpoint_every=20, eval_every=1000, log_every=1000)
    bar = _FillDisk(workdir)
    assert loop.train(c, workdir, progress=bar) == 1
    (line,) = _errors(capsys.readouterr().err)
    assert line.startswith('error: saving checkpoint step 40 to ')
    assert 'No space left on device' in line and 'newest verified checkpoint is step 20' in line
    assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == ['20']
    assert checkpoint.Checkpoints(workdir).verified(20)
    assert bar.n < 60                       # noticed within the steps, before the next save
  finally:
    subprocess.run(['umount', str(workdir)], check=False)


def test_a_save_error_names_its_cause_not_the_store_spec():
  """tensorstore's message as printed on a full disk: the cause, then the store's spec over
  several lines, then the OS error code. The line keeps the cause."""
  spec = "\n".join(["[tensorstore_spec='{\"context\":{\"cache_pool\":{}},", '"driver":"zarr",',
                     '"metadata":{"shape":[32,32]}}\'] [os_error_code=\'28\']'])
  e = ValueError('RESOURCE_EXHAUSTED: Error opening "zarr" driver: Error writing '
                 f'"{"x/" * 60}manifest.ocdbt": Failed to write 203 bytes to file 19: '
                 f'No space left on device {spec}')
  line = checkpoint._one_line(e)
  assert line.endswith('Failed to write 203 bytes to file 19: No space left on device')
  assert line.startswith('ValueError: RESOURCE_EXHAUSTED') and len(line) <= 320
  assert '\n' not in line and 'tensorstore_spec' not in line


def test_a_second_trainer_on_a_workdir_is_refused(tmp_path, data_dir):
  """The lock is an flock: it conflicts across open files, even in one process, and the
  OS releases it when its holder dies."""
  import fcntl
  with open(tmp_path / 'trainer.lock', 'w') as holder:
    fcntl.flock(holder, fcntl.LOCK_EX)
    holder.write('12345')
    holder.flush()
    with pytest.raises(loop.WorkdirError) as e:
      loop.train(_config(data_dir), tmp_path)
  assert str(tmp_path) in str(e.value) and 'pid 12345' in str(e.value)
  assert '\n' not in str(e.value) and not (tmp_path / 'checkpoints').exists()


def test_a_cut_off_last_metrics_line_is_dropped_on_resume(tmp_path, capsys):
  rows = [json.dumps({'step': s, 'loss': 1.0}) for s in (1, 2, 3)]
  (tmp_path / 'metrics.jsonl').write_text('\n'.join(rows) + '\n{"step": 4, "lo')
  loop.MetricsWriter(tmp_path, resume_step=2).close()
  assert [s for s, _, _ in _trace(tmp_path)] == [1, 2]
  assert 'cut-off last line' in capsys.readouterr().err


def test_steps_below_the_checkpoint_are_refused(straight, data_dir, tmp_path):
  shutil.copytree(straight, tmp_path, dirs_exist_ok=True)
  with pytest.raises(ConfigError, match=r'train.steps=12 is below step 15 .*'
                                        r'--config.train.steps=15 or more'):
    loop.train(_config(data_dir, steps=12, checkpoint_every=5, eval_every=15,
                       keep_checkpoints=2), tmp_path)


# --- data --------------------------------------------------------------------------------

def _files(folder, sizes):
  folder.mkdir()
  for i, n in enumerate(sizes):
    (folder / f'doc{i:02d}.txt').write_text('x' * n)
  return f'files:{folder}/*.txt'


@pytest.mark.parametrize('sizes,words', [
    ([50] * 60, ['validation split of files:', 'holds 150 bytes, less than one batch', '264 tokens',
                  '--config.train.seq_len']),
    ([5000], ['none of its 1 files falls in the \'validation\' split', 'give more files']),
    ([0] * 40, ['train split of files:', 'holds no text (0 bytes)'])])
def test_data_too_small_is_refused_before_the_first_step(tmp_path, sizes, words):
  c = _config('', steps=1000)
  c.data.source = _files(tmp_path / 'texts', sizes)
  with pytest.raises(loop.DataError) as e:
    loop.train(c, tmp_path / 'run')
  assert all(w in str(e.value) for w in words) and '\n' not in str(e.value)
  assert not (tmp_path / 'run' / 'metrics.jsonl').exists()


@pytest.mark.parametrize('damage', ['truncate', 'flip', 'lose'])
def test_a_damaged_corpus_cache_is_rebuilt(tmp_path, capsys, damage):
  from sparse_jax.data import corpus
  root = tmp_path / 'lib'
  root.mkdir()
  for i in range(30):
    (root / f'm{i:02d}.py').write_text(f'x = {i}\n' * (i + 20))
  built = corpus.build(tmp_path / 'cache', root=root, verbose=False)
  want = corpus.describe(built)['fingerprint']
  shard = next(pathlib.Path(built.data_dir).glob('*-train.array_record*'))
  raw = shard.read_bytes()
  if damage == 'truncate':
    shard.write_bytes(raw[:len(raw) // 2])
  elif damage == 'flip':
    shard.write_bytes(raw[:100] + bytes([raw[100] ^ 1]) + raw[101:])
  else:
    shard.unlink()
  capsys.readouterr()
  again = corpus.build(tmp_path / 'cache', root=root, verbose=False)
  assert f'corpus cache at {built.data_dir}' in capsys.readouterr().err
  assert corpus.describe(again)['fingerprint'] == want
  assert shard.read_bytes() == raw and digests.check(pathlib.Path(again.data_dir)) is None


# --- the command line: one line on stderr, exit 2 ----------------------------------------

def _cli(tmp_path, *flags, config=TINY):
  cmd = [sys.executable, '-m', 'sparse_jax.train', f'--config={config}', *flags]
  if not any(f.startswith('--workdir') for f in flags):
    cmd.append(f'--workdir={tmp_path / "run"}')
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize('flags,words', [
    (['--config.train.stepz=3'], ["unknown config key 'stepz' in --config.train.stepz",
                                  'Did you mean "steps"']),
    (['--cpu_devices=0'], ['--cpu_devices=0', 'positive']),
    (['--workdir={tmp}/afile'], ['--workdir=', 'it is a file']),
    (['--config.data.data_dir={tmp}/afile/sub'], ['cannot build the stdlib_py corpus',
                                                  'writable directory']),
    (['--cpu_devices=2', '--config.mesh.model=2', '--config.model.num_heads=1'],
     ['model.num_heads=1 must be divisible by mesh.model=2']),
    (['--config.data.source=tfds:no_such_dataset'], ['tfds:no_such_dataset is not a dataset',
                                                    'list_builders']),
])
def test_cli_mistakes_exit_2_with_one_line(tmp_path, data_dir, flags, words):
  (tmp_path / 'afile').write_text('')
  flags = [f.format(tmp=tmp_path) for f in flags]
  r = _cli(tmp_path, f'--config.data.data_dir={data_dir}', *flags)
  assert r.returncode == 2, r.stderr
  (line,) = [l for l in r.stderr.splitlines() if l.strip()]
  assert line.startswith('error: ') and all(w in line for w in words), line


def test_a_read_only_filesystem_is_refused_in_one_line(tmp_path):
  ro = tmp_path / 'ro'
  _mount_tmpfs(ro, '1m', 'ro')
  try:
    with pytest.raises(loop.WorkdirError, match=r'cannot write to --workdir=.*Read-only file '
                                                r'system; give a directory on a writable'):
      loop.train(_config(''), ro / 'run')
    c = _config(str(ro / 'data'))
    with pytest.raises(loop.DataError, match=r'cannot build the stdlib_py corpus in .*: '
                                             r'Read-only file system; point'):
      loop.train(c, tmp_path / 'run')
  finally:
    subprocess.run(['umount', str(ro)], check=False)


def test_a_config_file_without_the_base_sections_exits_2(tmp_path):
  cfg = tmp_path / 'mine.py'
  cfg.write_text('import ml_collections\n\ndef get_config():\n'
                 '  return ml_collections.ConfigDict({"model": {"d_model": 32}})\n')
  r = _cli(tmp_path, config=cfg)
  assert r.returncode == 2 and r.stderr.count('\n') == 1, r.stderr
  assert 'the config lacks data' in r.stderr and 'base_config()' in r.stderr


R, DP = sj.routing, sj.dispatch

# --- library inputs

B, L, D, F, E = 2, 16, 8, 16, 4
NAN, INF = (0, 3), (1, 9)                       # the tokens made non-finite
BAD = np.zeros((B, L), bool)
BAD[NAN] = BAD[INF] = True

# Every (dispatch, routing, k) the MoE serves; dropless is token choice only.
ROUTED = [(d, 'top_k', k) for d in DP.BACKENDS for k in (1, 2)] + [
    (d, 'expert_choice', 1) for d in DP.CAPACITY_BACKENDS]


def _moe(dispatch, routing, k, capacity_factor, mesh=None, **kw):
  # Same seed, same parameters whatever the backend.
  return sj.moe.MoE(D, F, E, k=k, dispatch=dispatch, routing=routing,
                    capacity_factor=capacity_factor, mesh=mesh, rngs=nnx.Rngs(0), **kw)


@nnx.jit
def _forward(layer, x):
  return layer(x)[0]


def _x(b=B, poison=False):
  x = jax.random.normal(jax.random.key(1), (b, L, D))
  return x.at[NAN].set(np.nan).at[INF].set(np.inf) if poison else x


def _assert_contained(layer, bad, want=None):
  """Under jit, with one token NaN and one +inf: those tokens' outputs are non-finite;
  every other output is finite (and equals `want` there, if given); the gradient of every
  parameter for a loss over the other tokens only is finite, and not all zero. aux's
  statistics over all tokens (balance loss, z-loss, entropy) may be NaN then: expected,
  not checked."""
  x = _x(bad.shape[0], poison=True)
  ct = jax.random.normal(jax.random.key(2), x.shape) * ~bad[..., None]

  @nnx.jit
  def run(layer, x):
    loss = lambda layer: jnp.sum(jnp.where(bad[..., None], 0, layer(x)[0]) * ct)
    return layer(x)[0], nnx.grad(loss)(layer)

  y, grads = run(layer, x)
  y = np.asarray(y)
  assert not np.isfinite(y[bad]).any()
  assert np.isfinite(y[~bad]).all(), f'{(~np.isfinite(y[~bad])).any(-1).sum()} others'
  if want is not None:
    np.testing.assert_allclose(y[~bad], want[~bad], rtol=1e-5, atol=1e-5)
  flat = [(p, np.asarray(v[...])) for p, v in nnx.to_flat_state(grads)]
  assert len(flat) >= 3
  for path, g in flat:
    assert np.isfinite(g).all(), path
  assert any(np.abs(g).max() > 0 for _, g in flat)


@pytest.mark.parametrize('dispatch,routing,k', ROUTED)
def test_moe_keeps_non_finite_tokens_in_their_tokens(dispatch, routing, k):
  """With capacity for every choice the layer is per token, so the other tokens' outputs
  equal those of the clean input under 'index': the bad tokens displaced nobody, and every
  backend agrees with 'index'. (einsum used to send them to the whole group.)"""
  cf = E / k                                    # C = S: nothing is dropped
  want = np.asarray(_forward(_moe('index', routing, k, cf), _x()))
  _assert_contained(_moe(dispatch, routing, k, cf), BAD, want)


@pytest.mark.parametrize('dispatch,routing,k', [
    c if c == ('einsum', 'top_k', 2) else pytest.param(*c, marks=pytest.mark.slow)
    for c in ROUTED])
def test_moe_contains_non_finite_tokens_with_drops(dispatch, routing, k):
  """Capacity factor 1.0 drops choices, so the other tokens' plans depend on each other:
  they stay finite, and the capacity backends agree with 'index'."""
  want = np.asarray(_forward(_moe('index', routing, k, 1.0), _x(poison=True)))
  _assert_contained(_moe(dispatch, routing, k, 1.0), BAD,
                    want if dispatch in DP.CAPACITY_BACKENDS else None)


@pytest.mark.slow
@pytest.mark.parametrize('dispatch,transport', [
    ('index', 'all_to_all'), ('einsum', 'all_to_all'), ('dropless', 'sized'),
    ('dropless', 'all_to_all'), ('dropless', 'all_gather'), ('dropless', 'ragged_reference')])
def test_moe_contains_non_finite_tokens_on_a_mesh(dispatch, transport):
  """Expert parallelism (2 x 4): the capacity all_to_all and every dropless transport."""
  mesh = jax.make_mesh((2, 4), ('data', 'expert'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  bad = np.zeros((8, L), bool)
  bad[NAN] = bad[INF] = True
  _assert_contained(_moe(dispatch, 'top_k', 2, 1.0, mesh=mesh, ep_transport=transport), bad)


def _routed(backend, x, logits, w, c, poison=()):
  """Dispatch -> experts -> combine for one group x [S, D] under route_top_k(k=2); each
  (expert, slot, value) of poison overwrites an expert output row (an expert that
  overflowed)."""
  plan = R.route_top_k(logits, 2, c)
  buf, ctx = DP.CAPACITY_BACKENDS[backend].dispatch(x, plan, w.shape[0], c)
  out = jnp.einsum('ecd,edf->ecf', buf, w)
  for e, slot, value in poison:
    out = out.at[e, slot].set(value)
  return DP.CAPACITY_BACKENDS[backend].combine(out, plan, ctx)


@pytest.mark.parametrize('where', ['token', 'slot'])
@pytest.mark.parametrize('backend', sorted(DP.CAPACITY_BACKENDS))
def test_dispatch_keeps_non_finite_rows_in_their_tokens(backend, where):
  """Straight through the capacity backends, without the MoE's guard: a NaN and an inf
  token (dispatched: their logits are finite), or expert output row, reach only the
  tokens routed through them, and the gradients of x and the logits for the other tokens
  stay finite. (einsum's one-hot products sent them to the whole group: 0 * NaN = NaN.)"""
  s, c = 12, 4
  r = np.random.default_rng(0)
  x, logits, ct = (jnp.asarray(r.normal(size=sh), jnp.float32) for sh in
                   ((s, D), (s, E), (s, D)))
  w = jnp.asarray(r.normal(size=(E, D, D)) / math.sqrt(D), jnp.float32)
  plan = jax.tree.map(np.asarray, R.route_top_k(logits, 2, c))
  if where == 'token':
    hit, poison = np.isin(np.arange(s), [3, 7]), ()
    x = x.at[3].set(np.nan).at[7].set(np.inf)
  else:                                         # the first slots of tokens 0 and 5
    poison = [(plan.expert[t, 0], plan.slot[t, 0], v) for t, v in ((0, np.nan), (5, np.inf))]
    hit = np.zeros(s, bool)
    for e, slot, _ in poison:
      hit |= ((plan.expert == e) & (plan.slot == slot) & plan.kept).any(-1)
  assert plan.kept[hit].any() and 2 <= hit.sum() < s

  @jax.jit
  def run(x, logits):
    routed = lambda b, x, logits: _routed(b, x, logits, w, c, poison)
    loss = lambda x, logits: jnp.sum(jnp.where(hit[:, None], 0, routed(backend, x, logits)) * ct)
    return (routed(backend, x, logits), routed('index', x, logits),
            jax.grad(loss, (0, 1))(x, logits))

  y, want, grads = jax.device_get(run(x, logits))
  assert (~np.isfinite(y[hit])).any(-1).all()
  assert np.isfinite(y[~hit]).all()
  np.testing.assert_allclose(y[~hit], want[~hit], rtol=1e-5, atol=1e-6)
  for name, g in zip(('dx', 'dlogits'), grads):
    assert np.isfinite(g[~hit]).all(), name


@pytest.mark.parametrize('routing', ['top_k', 'expert_choice'])
def test_routing_sends_tokens_with_undefined_softmax_nowhere(routing):
  """Tokens with NaN logits request nothing (slot -1), and the other tokens' plans, drops
  included, are those of the group without them. The NaN here is a constant under jit,
  as a layer masking its non-finite tokens would write: XLA:CPU folded it through the
  softmax's exp into finite garbage, and the NaN token was routed and took other tokens'
  slots. A -inf logit stays legal: it only rules its expert out."""
  s, c = 12, 3
  bad = np.isin(np.arange(s), [2, 5])
  x = jax.random.normal(jax.random.key(4), (s, D)).at[2].set(np.nan).at[5].set(np.inf)
  w = jax.random.normal(jax.random.key(5), (D, E))

  def logits(x):
    ok = jnp.all(jnp.isfinite(x), axis=-1, keepdims=True)
    return jnp.where(ok, jnp.where(ok, x, 0) @ w, jnp.nan)

  route = lambda l: (R.route_top_k(l, 2, c) if routing == 'top_k' else
                     R.route_expert_choice(l, c))
  grouped = jax.jit(lambda x: jax.vmap(route)(logits(x)[None]))       # as the MoE does
  plan = jax.tree.map(lambda a: np.asarray(a)[0], grouped(x))
  alone = jax.tree.map(np.asarray, route(logits(x)[~bad]))
  assert (plan.slot[bad] == -1).all() and not plan.kept[bad].any()
  assert (plan.weight[bad] == 0).all() and not plan.kept.all()        # with drops
  for name in ('expert', 'slot', 'kept'):
    np.testing.assert_array_equal(getattr(plan, name)[~bad], getattr(alone, name),
                                  err_msg=name)
  np.testing.assert_allclose(plan.weight[~bad], alone.weight, rtol=1e-6)
  ruled_out = route(logits(x)[~bad].at[0, 3].set(-np.inf))
  assert ruled_out.kept[0].any() and not (ruled_out.kept[0] & (ruled_out.expert[0] == 3)).any()


@pytest.mark.parametrize('dtype', [jnp.int32, jnp.uint8])
@pytest.mark.parametrize('name', ['MoE', 'DenseFFN', 'RMSNorm', 'Attention'])
def test_layers_refuse_integer_input(name, dtype):
  """Integers used to come back as integers (int32 truncated, uint8 clipped at 0), or
  through integer-truncated weights."""
  layer = {'MoE': lambda: sj.moe.MoE(D, F, E),
           'DenseFFN': lambda: layers.DenseFFN(D, F, rngs=nnx.Rngs(0)),
           'RMSNorm': lambda: layers.RMSNorm(D),
           'Attention': lambda: layers.Attention(D, 2, rngs=nnx.Rngs(0))}[name]()
  dt = jnp.dtype(dtype).name
  with pytest.raises(TypeError, match=rf'{name} input dtype {dt} is not floating.*astype'):
    layer(jnp.ones((B, L, D), dtype))


@pytest.mark.parametrize('cf', [math.inf, math.nan])
def test_capacity_factor_must_be_finite(cf):
  """inf was accepted by the constructor and failed at call time with OverflowError."""
  for make in (lambda: sj.moe.MoE(D, F, E, capacity_factor=cf),
               lambda: R.capacity(8, E, 1, cf)):
    with pytest.raises(ValueError, match=rf'capacity_factor={cf} must be a finite.*dropless'):
      make()


def test_capacity_refuses_negative_token_counts():
  """capacity(-5, ...) used to return 1; 0 tokens keeps the floor of 1 slot."""
  with pytest.raises(ValueError, match='num_tokens=-5 must be >= 0'):
    R.capacity(-5, E, 1, 1.0)
  assert R.capacity(0, E, 1, 1.0) == 1


def _re_shape(shape):
  return r'\(' + ', '.join(map(str, shape)) + r'\)'


@pytest.mark.parametrize('shape', [(0, L, D), (B, 0, D)])
def test_moe_refuses_an_empty_batch(shape):
  """Used to be a ZeroDivisionError in the grouping."""
  for dispatch in DP.BACKENDS:
    with pytest.raises(ValueError, match=_re_shape(shape) + '.*no tokens'):
      sj.moe.MoE(D, F, E, dispatch=dispatch)(jnp.zeros(shape))


def test_transformer_refuses_empty_tokens():
  c = base_config()
  c.model.update(d_model=8, num_layers=1, num_heads=2, d_ff=16)
  c.moe.update(num_experts=4, moe_offset=0)
  model = models.TransformerLM(model_spec(c), rngs=nnx.Rngs(0))
  for shape in [(0, 4), (2, 0)]:
    with pytest.raises(ValueError, match=r'B >= 1 and L >= 1.*' + _re_shape(shape)):
      model(jnp.zeros(shape, jnp.int32))


def test_n_m_works_with_the_default_schedule():
  """The docstring promises one-shot N:M under any schedule; the default 'gmp' used to
  demand an end_step."""
  params = {'ffn': {'wi': jax.random.normal(jax.random.key(3), (8, 6))}}
  tx = pruning.wrap(optax.adam(1e-3), n_m=(2, 4))
  updates, state = tx.update(params, tx.init(params), params)
  params = optax.apply_updates(params, updates)
  runs = lambda a: np.asarray(a).T.reshape(-1, 4)               # groups of M on axis 0
  assert (runs(pruning.masks(state)['ffn']['wi']).sum(-1) == 2).all()
  assert ((runs(params['ffn']['wi']) != 0).sum(-1) == 2).all()
