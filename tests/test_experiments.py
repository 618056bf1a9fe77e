"""Smoke tests of the experiment scripts: each runs end to end at the 'smoke' preset
(tiny models, a few steps) and writes its result files; compare.py's numbers are checked
for internal consistency. The committed results come from the same code at larger presets.
"""
import importlib
import json
import pathlib
import sys

import pytest

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / 'experiments'
sys.path.insert(0, str(EXPERIMENTS))

REPROS = {'repro_switch_table1': 'switch_table1', 'repro_expert_count': 'expert_count',
          'repro_init_scale': 'init_scale', 'repro_z_loss': 'z_loss',
          'repro_loss_free': 'loss_free', 'repro_pruning': 'pruning',
          'repro_activation_sparsity': 'activation_sparsity',
          'repro_quantization': 'quantization'}


@pytest.fixture(scope='module')
def dirs(tmp_path_factory):
  # One runs folder for the module: the scripts share identical runs, as they do for users.
  return tmp_path_factory.mktemp('out'), tmp_path_factory.mktemp('runs')


def _run(script, dirs):
  out, runs = dirs
  importlib.import_module(script).main(['--preset', 'smoke', '--out', str(out),
                                        '--runs', str(runs)])


def test_compare_smoke(dirs):
  _run('compare', dirs)
  out = dirs[0]
  for ext in ('md', 'csv', 'json', 'png'):
    assert (out / f'compare_smoke.{ext}').stat().st_size > 0
  result = json.loads((out / 'compare_smoke.json').read_text())
  meta, rows = result['meta'], {r['model']: r for r in result['rows']}
  assert set(rows) == {'dense-small', 'switch', 'top2-half', 'top2-full', 'large-sparse',
                       'structured', 'dense-large'}
  assert meta['git_rev'] and meta['corpus']['fingerprint'] and meta['seeds'] == [0]
  assert meta['devices'].startswith('8 x')
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
  assert '| dense-small | baseline |' in (out / 'compare_smoke.md').read_text()


# Every script has a smoke test; the default run keeps the three that exercise distinct code
# (loading trained models, probes, qwix) and marks the rest slow (pytest -m slow) to keep CI
# short. All of them ran at the quick preset for experiments/results.
FAST = {'repro_loss_free', 'repro_activation_sparsity', 'repro_quantization'}


@pytest.mark.parametrize('script', [s if s in FAST else pytest.param(s, marks=pytest.mark.slow)
                                    for s in sorted(REPROS)])
def test_reproduction_smoke(script, dirs):
  _run(script, dirs)
  out = dirs[0]
  md = (out / f'{REPROS[script]}_smoke.md').read_text()
  rows = json.loads((out / f'{REPROS[script]}_smoke.json').read_text())['rows']
  assert rows and '## Trends' in md and ('**holds**' in md or '**does not hold**' in md)
  assert '`python ' in md and 'seeds' in md
