"""Smoke tests of the experiment scripts: each runs end to end at the 'smoke' preset
(tiny models, a few steps) and writes its result files; compare.py's numbers are checked
for internal consistency; a finished run is reused only under the library that trained
it. The committed results come from the same code at larger presets.
"""
import importlib
import json
import os
import pathlib
import subprocess
import sys

import pytest

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / 'experiments'
sys.path.insert(0, str(EXPERIMENTS))

common = importlib.import_module('common')            # experiments/common.py

REPROS = {'repro_switch_table1': 'switch_table1', 'repro_expert_count': 'expert_count',
          'repro_init_scale': 'init_scale', 'repro_z_loss': 'z_loss',
          'repro_loss_free': 'loss_free', 'repro_pruning': 'pruning',
          'repro_activation_sparsity': 'activation_sparsity',
          'repro_quantization': 'quantization', 'repro_dst': 'dst',
          'repro_oneshot': 'oneshot', 'repro_expert_pruning': 'expert_pruning'}
SCRIPTS = sorted(p.stem for p in EXPERIMENTS.glob('*.py')
                 if p.stem not in ('common', 'timing'))          # the two helper modules


@pytest.fixture(scope='module')
def dirs(tmp_path_factory):
  # One runs folder for the module: the scripts share identical runs, as they do for users.
  return tmp_path_factory.mktemp('out'), tmp_path_factory.mktemp('runs')


def _run(script, dirs):
  out, runs = dirs
  importlib.import_module(script).main(['--preset', 'smoke', '--out', str(out),
                                        '--runs', str(runs)])


def _check_meta(meta, corpus=True):
  assert meta['git_rev'] and meta['command'].startswith('python ') and meta['seeds']
  assert meta['library_sha256'] == common.library_hash()
  assert meta['devices'].startswith('8 x') and meta['jax'] and meta['date']
  assert ('corpus' in meta) == corpus and (not corpus or meta['corpus']['fingerprint'])


@pytest.mark.parametrize('script', SCRIPTS)
def test_no_import_side_effects(script):
  """Devices are set up by main(), not by importing; the study scripts take the shared
  arguments and write through the one report helper."""
  text = (EXPERIMENTS / f'{script}.py').read_text()
  assert 'noqa: E402' not in text and 'XLA_FLAGS' not in text
  devices = 1 if script == 'bench_decode' else 8        # decoding: one chip's speed
  if script != 'bench_compaction':                      # one device, as it always ran
    assert f'common.setup_devices({devices}' in text
  if script in REPROS or script == 'compare':
    assert 'common.report(' in text and 'write_results' not in text
    assert 'Runner(' not in text and '.train(' not in text  # runs named in common only


def test_git_rev_marks_uncommitted(monkeypatch):
  monkeypatch.setattr(common, '_git', lambda *a: ' M x.py' if a[0] == 'status' else 'abc1234')
  assert common.git_rev() == 'abc1234+uncommitted'
  monkeypatch.setattr(common, '_git', lambda *a: '' if a[0] == 'status' else 'abc1234')
  assert common.git_rev() == 'abc1234'


def test_library_hash_follows_the_source(tmp_path):
  (tmp_path / 'sub').mkdir()
  (tmp_path / 'a.py').write_text('x = 1\n')
  (tmp_path / 'sub' / 'b.py').write_text('y = 2\n')
  (tmp_path / 'notes.txt').write_text('not code')
  digest = common.library_hash.__wrapped__                # uncached
  before = digest(tmp_path)
  (tmp_path / 'notes.txt').write_text('still not code')
  assert digest(tmp_path) == before
  (tmp_path / 'sub' / 'b.py').write_text('y = 3\n')
  assert digest(tmp_path) != before
  assert len(common.library_hash()) == 64


@pytest.mark.slow
def test_finished_run_reused_only_under_the_same_library(tmp_path, monkeypatch):
  config = common.moe(common.sized('smoke', steps=1))        # expert-parallel MoE
  train = lambda: common.run_study('t', 'smoke', {'moe': config}, tmp_path)['moe']
  first = train()
  workdir = first['workdir']
  assert workdir.name == common.run_name(config)
  assert first['code'] == common.code_version()
  (workdir / 'marker').touch()
  again = train()                                         # same code: reused as it is
  assert (workdir / 'marker').exists() and again['curve'] == first['curve']
  assert again['code']['library_sha256'] == common.provenance([0], None)['library_sha256']
  monkeypatch.setattr(common, 'library_hash', lambda root=None: 'f' * 64)
  changed = train()                                       # other code: wiped, retrained
  assert not (workdir / 'marker').exists()
  assert changed['code']['library_sha256'] == 'f' * 64
  assert json.loads((workdir / 'code.json').read_text())['library_sha256'] == 'f' * 64
  log = (workdir / 'log.txt').read_text()
  assert 'retraining' in log and 'library source changed' in log


@pytest.mark.slow
def test_compare_smoke(dirs):
  _run('compare', dirs)
  out = dirs[0]
  for ext in ('md', 'csv', 'json', 'png'):
    assert (out / f'compare_smoke.{ext}').stat().st_size > 0
  result = json.loads((out / 'compare_smoke.json').read_text())
  meta, rows = result['meta'], {r['model']: r for r in result['rows']}
  assert set(rows) == {'dense-small', 'switch', 'top2-half', 'switch-dropless',
                       'top2-half-dropless', 'top2-full', 'large-sparse', 'structured',
                       'dense-large'}
  _check_meta(meta)
  assert meta['seeds'] == [0]
  for code in (dirs[1] / 'compare_smoke').glob('*/code.json'):   # every run: today's code
    assert json.loads(code.read_text())['library_sha256'] == meta['library_sha256']
  base = rows['dense-small']
  assert base['step_time_ratio'] == 1.0 and base['time_to_target'] == pytest.approx(1.0)
  # The matching the comparison promises.
  assert rows['switch']['active_params'] - base['active_params'] < 0.05 * base['active_params']
  assert rows['top2-half']['active_params'] == rows['switch']['active_params']
  assert rows['top2-full']['total_params'] == rows['switch']['total_params']
  assert abs(rows['dense-large']['total_params'] / rows['switch']['total_params'] - 1) < 0.02
  assert rows['large-sparse']['nonzero_params'] == pytest.approx(base['total_params'], rel=0.01)
  # Memory counts every stored weight (active or not, zero or not) plus the embeddings.
  assert len({r['param_bytes'] - 4 * r['total_params'] for r in rows.values()}) == 1
  assert rows['large-sparse']['total_params'] > 4 * base['total_params']
  s = rows['structured']
  assert s['total_params'] == base['total_params']                         # compacted shape
  assert s['compacted_val_loss'] == pytest.approx(s['masked_val_loss'], abs=1e-4)
  for r in rows.values():
    assert r['val_loss'] > 0 and r['bpb'] == pytest.approx(r['val_loss'] / 0.6931, rel=1e-3)
  assert 0 <= rows['switch']['dropped_fraction'] <= 1
  for name in ('switch', 'top2-half'):
    dropless = rows[f'{name}-dropless']
    assert dropless['dropped_fraction'] == 0
    assert dropless['active_params'] == rows[name]['active_params']
  md = (out / 'compare_smoke.md').read_text()
  assert '| dense-small | baseline |' in md and meta['library_sha256'][:12] in md


# Every script has a smoke test, under -m slow to keep the default run short. All of them
# ran at the quick preset for experiments/results.
@pytest.mark.slow
@pytest.mark.parametrize('script', sorted(REPROS))
def test_reproduction_smoke(script, dirs):
  _run(script, dirs)
  out = dirs[0]
  md = (out / f'{REPROS[script]}_smoke.md').read_text()
  result = json.loads((out / f'{REPROS[script]}_smoke.json').read_text())
  assert result['rows'] and '## Trends' in md
  assert '**holds**' in md or '**does not hold**' in md
  assert '`python ' in md and 'seeds' in md and 'library sha256' in md
  _check_meta(result['meta'])


def test_bench_compaction_provenance(tmp_path, capsys):
  path = tmp_path / 'bench.json'
  importlib.import_module('bench_compaction').main(['--quick', '--repeats', '1',
                                                    '--json', str(path)])
  result = json.loads(path.read_text())
  assert next(iter(result)) == 'meta' and len(result['rows']) == 2
  _check_meta(result['meta'], corpus=False)
  assert capsys.readouterr().out.startswith('# Compaction')


@pytest.mark.slow
@pytest.mark.parametrize('script', ['bench_train', 'bench_moe_layer'])
def test_bench_provenance(script, tmp_path, capsys):
  path = tmp_path / 'bench.json'
  args = ['--quick', '--json', str(path)]
  importlib.import_module(script).main(args + (['--steps', '1'] if script == 'bench_train'
                                               else ['--repeats', '1']))
  result = json.loads(path.read_text())
  assert next(iter(result)) == 'meta'
  _check_meta(result['meta'], corpus=False)
  assert capsys.readouterr().out.startswith('# ')


@pytest.mark.slow
def test_bench_memory_and_bf16_provenance(tmp_path, capsys):
  importlib.import_module('bench_memory').main(['--quick', '--steps', '1', '--out',
                                                str(tmp_path)])
  result = json.loads((tmp_path / 'bench_memory.json').read_text())
  _check_meta(result['meta'], corpus=False)
  rows = result['rows']
  assert len(rows) == 8 and {r['fsdp'] for r in rows} == {False, True}
  # FSDP over 8 data shards: within 1.15x of an eighth of the state (tiny norm scales and
  # counters stay replicated).
  assert all(r['state_vs_total_over_8'] <= 1.15 for r in rows if r['fsdp'])
  importlib.import_module('bench_bf16').main(['--steps', '2', '--json',
                                              str(tmp_path / 'bf16.json')])
  result = json.loads((tmp_path / 'bf16.json').read_text())
  _check_meta(result['meta'])
  assert 0 <= result['max_rel_train_loss'] < 1e-2


@pytest.mark.slow
def test_bench_remat_cpu_shows_when_remat_saves(tmp_path):
  """The account of remat on XLA:CPU in docs/scaling.md: it saves memory only under the
  memory-aware scheduler and only when no gradient reaches the first layer's input."""
  importlib.import_module('bench_remat_cpu').main(['--json', str(tmp_path / 'r.json')])
  rows = {(r['scheduler'], r['input']): r['ratio']
          for r in json.loads((tmp_path / 'r.json').read_text())['rows']}
  assert rows[('memory-aware', 'argument, no gradient')] > 1.5
  assert all(v < 1.1 for k, v in rows.items() if k != ('memory-aware', 'argument, no gradient'))


def test_bench_hub_load_measures_a_sharded_load(tmp_path):
  """A quick folder loaded with FSDP over 8 devices: each device holds an eighth of the
  parameters (norm scales replicated), and the numbers come with provenance."""
  row = importlib.import_module('bench_hub_load').main(['--quick', '--out', str(tmp_path)])
  result = json.loads((tmp_path / 'bench_hub_load.json').read_text())
  _check_meta(result['meta'], corpus=False)
  assert result['rows'] == [json.loads(json.dumps(row))]
  assert row['param_bytes_per_device'] <= 1.15 * row['param_bytes'] / 8
  assert row['peak_rss'] >= row['baseline_rss'] + row['param_bytes']


@pytest.mark.slow
def test_bench_decode_measures_every_model_and_batch(tmp_path):
  """One device (a fresh process: the tests run on 8): every model at every batch, with
  provenance, the plot, and the decode path MoE.generate takes at each batch."""
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  r = subprocess.run([sys.executable, str(EXPERIMENTS / 'bench_decode.py'), '--quick', '--out',
                      str(tmp_path)], capture_output=True, text=True, env=env, timeout=900)
  assert r.returncode == 0, r.stderr
  result = json.loads((tmp_path / 'bench_decode.json').read_text())
  meta = result['meta']
  assert meta['devices'].startswith('1 x') and meta['library_sha256'] == common.library_hash()
  size = meta['size']
  models = ['dense_small', 'switch', 'top2', 'dense_large', 'int8', 'pruned_50', 'pruned_2_4']
  assert {(row['model'], row['batch']) for row in result['rows']} == {
      (m, b) for m in models for b in size['batches']}
  assert all(row['decode_ms_per_token'] > 0 and row['prefill_tokens_per_s'] > 0
             for row in result['rows'])
  from sparse_jax.moe import generate_path
  paths = meta['decode_paths']
  assert {(row['model'], row['batch']) for row in paths} == {
      (m, b) for m in ('switch', 'top2') for b in size['path_batches']}
  assert [row['generate_takes'] for row in paths] == [
      generate_path(row['batch'], row['k'], size['experts']) for row in paths]
  assert set(meta['summary']) >= {'switch_over_dense_small_b1', 'switch_over_dense_large_b1'}
  assert (tmp_path / 'bench_decode.png').stat().st_size > 0


@pytest.mark.slow
def test_hub_reference_is_within_tolerance(tmp_path):
  importlib.import_module('hub_reference').main(['--out', str(tmp_path)])
  rows = json.loads((tmp_path / 'hub_reference.json').read_text())['rows']
  assert len(rows) == 10 and all(r['one_device'] <= 1e-4 and r['mesh_2x4'] <= 1e-4
                                 for r in rows)


@pytest.mark.slow
def test_bench_host_memory_compares_both_settings(tmp_path, capsys):
  """Children with freed memory kept and with glibc's defaults time every model; kept
  memory takes fewer page faults per step."""
  module = importlib.import_module('bench_host_memory')
  rows, faults = module.main(['--quick', '--steps', '2', '--json', str(tmp_path / 'h.json')])
  result = json.loads((tmp_path / 'h.json').read_text())
  _check_meta(result['meta'], corpus=False)
  assert [r['model'] for r in rows] == list(module.MODELS)
  assert all(r['step_time_kept_over_defaults'] > 0 for r in rows)
  assert faults['kept'] < faults['defaults']
  assert capsys.readouterr().out.startswith('# Host memory')
