"""`python -m sparse_jax.convert`: Hugging Face folders into workdirs that train, compress
and export back; bad input exits 2 with one line and leaves no workdir."""
import json
import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_jax import convert, hub
from sparse_jax.training import checkpoint, loop

ROOT = pathlib.Path(__file__).resolve().parents[1]
HF = ROOT / 'tests' / 'hf'


def params(model) -> dict:
  return {'/'.join(map(str, p)): np.asarray(v[...])
          for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_from_hf_then_to_hf_gives_the_folder_back(tmp_path):
  w = convert.from_hf(str(HF / 'mixtral'), str(tmp_path / 'w'))
  assert sorted(os.listdir(tmp_path)) == ['w']                  # no partial output left
  ckpts = checkpoint.Checkpoints(w)
  assert ckpts.steps() == [0] and ckpts.verified(0)
  ckpts.close()
  assert (w / 'config.py').exists() and (w / 'hf' / 'config.json').exists()
  out = convert.to_hf(str(w), str(tmp_path / 'out'))
  a, spec_a = hub.load_hf(HF / 'mixtral')
  b, spec_b = hub.load_hf(out)
  assert spec_a == spec_b
  pa, pb = params(a), params(b)
  for k in pa:
    np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)
  with pytest.raises(convert.FlagError, match='already exists and is not empty'):
    convert.from_hf(str(HF / 'mixtral'), str(w))


def test_overrides_may_change_how_it_trains_not_what_it_is(tmp_path):
  with pytest.raises(convert.FlagError, match='the imported model determines model.d_model'):
    convert.from_hf(str(HF / 'llama'), str(tmp_path / 'w'), {'model.d_model': 64})
  w = convert.from_hf(str(HF / 'llama'), str(tmp_path / 'w'),
                      {'train.seq_len': 64, 'moe.z_loss_coef': 0.0})
  config = json.loads((w / 'config.json').read_text())
  assert config['train']['seq_len'] == 64
  assert config['data']['tokenizer'] == str(w / 'tokenizer.json')      # the folder's own
  assert config['data']['eod_id'] == 2                                  # its '</s>'


def _convert(*args, env=None):
  return subprocess.run([sys.executable, '-m', 'sparse_jax.convert', *args],
                        capture_output=True, text=True, cwd=ROOT, env=env)


@pytest.mark.parametrize('case', ['no config.json', 'missing tensor'])
def test_cli_refuses_a_bad_folder_in_one_line(case, tmp_path):
  import shutil
  from sparse_jax.hub import safetensors as st
  src = tmp_path / 'src'
  shutil.copytree(HF / 'llama', src)
  if case == 'no config.json':
    (src / 'config.json').unlink()
    want = 'has no config.json'
  else:
    entries = st.read_folder(src)
    arrays = {k: st.load(e) for k, e in entries.items() if k != 'model.norm.weight'}
    (src / 'model.safetensors').unlink()
    st.write(src, [st.Tensor(k, v.shape, v.dtype, lambda v=v: v) for k, v in arrays.items()])
    want = 'tensor model.norm.weight is missing'
  r = _convert(f'--from_hf={src}', f'--workdir={tmp_path / "w"}')
  assert r.returncode == 2, r.stderr
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: ') and want in lines[0]
  assert not (tmp_path / 'w').exists() and not (tmp_path / '.w.incomplete').exists()


@pytest.mark.slow
def test_an_imported_moe_fine_tunes_compresses_and_exports(tmp_path, monkeypatch):
  """Qwen2-MoE: fine-tuned on text files with a tokenizer.json (its loss falls), its
  experts pruned 8 -> 4 and its kernels 50% Wanda-pruned, exported, and read back (by
  transformers too, where it is installed) with the zeros and the 4 experts."""
  from sparse_jax import compress
  from sparse_jax.config import load_config, resolve
  monkeypatch.setenv('SPARSE_JAX_DATA', str(tmp_path / 'data'))
  files = f'files:{ROOT}/sparse_jax/**/*.py'
  w = convert.from_hf(str(HF / 'qwen2_moe'), str(tmp_path / 'w'), {
      'data.source': files, 'data.tokenizer': str(HF / 'llama' / 'tokenizer.json'),
      'train.batch_size': 8, 'train.seq_len': 64, 'train.steps': 40, 'train.lr': 3e-3,
      'train.warmup_steps': 4, 'train.eval_every': 20, 'train.eval_batches': 4,
      'train.checkpoint_every': 20, 'train.log_every': 5})
  assert loop.train(load_config(w / 'config.py'), w) == 0
  rows = [json.loads(l) for l in (w / 'metrics.jsonl').read_text().splitlines()]
  evals = [r['loss'] for r in rows if 'split' in r]
  first = next(r['loss'] for r in rows if 'split' not in r)           # step 5
  assert evals[-1] < evals[0] < first - 0.5

  common = dict(calibration_batches=2)
  compress.compress(compress.Options(workdir=str(w), out=str(tmp_path / 'e'),
                                     method='experts', keep=4, score='frequency', **common))
  compress.compress(compress.Options(workdir=str(tmp_path / 'e'), out=str(tmp_path / 'p'),
                                     method='wanda', sparsity=0.5, **common))
  out = convert.to_hf(str(tmp_path / 'p'), str(tmp_path / 'out'))
  config = json.loads((out / 'config.json').read_text())
  assert config['num_experts'] == 4 and config['architectures'] == ['Qwen2MoeForCausalLM']
  model, spec = hub.load_hf(out)
  kernel = np.asarray(model.blocks[0].ffn.experts.wi[...])
  assert kernel.shape[0] == 4 and np.mean(kernel == 0) == pytest.approx(0.5, abs=0.01)
  _, _, trained = checkpoint.load_model(tmp_path / 'p', loop.make_mesh(
      resolve(load_config(tmp_path / 'p' / 'config.py'), 8)))
  pm, pt = params(model), params(trained)
  assert pm.keys() == pt.keys()
  for k in pm:
    np.testing.assert_array_equal(pm[k], pt[k], err_msg=k)
  tokens = np.arange(64, dtype=np.int32).reshape(1, 64) % 120
  if _has_transformers():
    sys.path.insert(0, str(HF))
    from make_fixtures import hf_logits
    np.testing.assert_allclose(hf_logits(out, tokens), model(jnp.asarray(tokens))[0],
                               atol=1e-4)


def _has_transformers() -> bool:
  try:
    import torch  # noqa: F401
    import transformers  # noqa: F401
  except ImportError:
    return False
  return True


def test_a_tokenizer_json_gives_the_ids_transformers_gives():
  """data.tokenizer: the pipeline's ids of a text are the tokenizer's own (the sample
  tests/hf/make_fixtures.py stored), then eod_id."""
  from sparse_jax.data import pipeline
  sample = json.loads((HF / 'llama' / 'reference.json').read_text())['tokenizer_sample']
  tokens = pipeline.tokenizer_fn(HF / 'llama' / 'tokenizer.json', 2)(sample['text'])['tokens']
  assert tokens.tolist() == sample['ids'] + [2]


def test_byte_data_needs_256_token_ids():
  """An imported model with a small vocabulary cannot train on byte tokens: refused with
  the fix, before anything compiles."""
  from sparse_jax import hub
  from sparse_jax.config import resolve
  c = hub.import_config(HF / 'mixtral')                      # vocab 128, no tokenizer.json
  with pytest.raises(loop.DataError, match='model.vocab_size=128 is below the 256 byte'):
    loop.check_vocab(resolve(c, 8))


def test_a_run_trained_with_expert_parallelism_loads_on_one_device(data_dir, tmp_path,
                                                                    monkeypatch):
  """Loading needs only the model to fit: a run trained with mesh.expert=4 on 8 devices
  loads on one device (and on the default mesh) with the same parameters."""
  import jax
  from sparse_jax import sharding
  from sparse_jax.config import load_config, resolve
  from sparse_jax.training.steps import build as build_steps
  monkeypatch.setenv('SPARSE_JAX_DATA', data_dir)
  c = load_config(ROOT / 'configs' / 'tiny.py')
  c.mesh.expert = 4
  c.train.steps = c.train.eval_every = c.train.checkpoint_every = 2
  assert loop.train(c, tmp_path / 'run') == 0
  ckpts = checkpoint.Checkpoints(tmp_path / 'run')
  stored = ckpts.model_spec(ckpts.steps()[0])
  ckpts.close()
  assert stored == resolve(c, 8).model             # the step stores the resolved spec
  with monkeypatch.context() as m:                 # loading builds no optimizer
    m.setattr(nnx, 'Optimizer', lambda *a, **k: pytest.fail('load_model built an optimizer'))
    _, spec, here = checkpoint.load_model(tmp_path / 'run')
  assert spec.model == stored
  one = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  _, spec, alone = checkpoint.load_model(tmp_path / 'run', one)
  assert spec.mesh == {'data': 1, 'expert': 1, 'model': 1}
  assert {d for v in jax.tree.leaves(nnx.state(alone)) for d in v.devices()} == {
      jax.devices()[0]}
  pa, ph = params(alone), params(here)
  for k in pa:
    np.testing.assert_array_equal(pa[k], ph[k], err_msg=k)
  # ... and they are the parameters a full restore of (model, optimizer) gives.
  steps = build_steps(resolve(c, 8), loop.make_mesh(resolve(c, 8)))
  ckpts = checkpoint.Checkpoints(tmp_path / 'run')
  full, _ = nnx.merge(steps.graphdef, ckpts.restore(2, steps.state, steps.shardings))
  ckpts.close()
  for k, v in params(full).items():
    np.testing.assert_array_equal(v, ph[k], err_msg=k)
  # A step written before specs were stored builds the spec from its config.
  import shutil
  from sparse_jax import digests
  step_dir = tmp_path / 'run' / 'checkpoints' / '2'
  shutil.rmtree(step_dir / 'model')
  digests.write_manifest(step_dir)
  _, spec, old = checkpoint.load_model(tmp_path / 'run')
  assert spec.model == stored
  for k, v in params(old).items():
    np.testing.assert_array_equal(v, ph[k], err_msg=k)
