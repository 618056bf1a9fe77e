"""Hugging Face checkpoints in and out, checked against transformers' own outputs.

tests/hf/<family>/ holds tiny random-weight models that transformers built and saved, with
its logits on two 256-token rows (reference.npz); tests/hf/make_fixtures.py remakes them
(it needs torch and transformers, which the tests do not).
"""
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_jax import hub
from sparse_jax.config import ARCHITECTURES
from sparse_jax.hub import safetensors as st
from sparse_jax.sharding import make_mesh

HF = pathlib.Path(__file__).parent / 'hf'
FAMILIES = ['llama', 'mistral', 'mistral_bf16', 'mixtral', 'mixtral_fused', 'qwen2_moe',
            'qwen3_moe', 'olmoe', 'deepseek_v3', 'deepseek_v3_fp8']
MOE = ['mixtral', 'qwen2_moe', 'qwen3_moe', 'olmoe', 'deepseek_v3']
# Folders transformers holds differently from how it writes them: fused experts, fp8.
NOT_AS_WRITTEN = ('mixtral_fused', 'deepseek_v3_fp8')
TOL = 1e-4                                       # float32, max |logit difference|


def reference(name):
  return np.load(HF / name / 'reference.npz')


def params(model) -> dict:
  return {'/'.join(map(str, p)): np.asarray(v[...])
          for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_architectures_are_the_families():
  assert tuple(hub.FAMILIES) == ARCHITECTURES


@pytest.mark.parametrize('name', FAMILIES)
def test_logits_match_transformers(name):
  ref = reference(name)
  assert ref['tokens'].shape[1] >= 256              # long enough that RoPE errors show
  model, spec = hub.load_hf(HF / name)
  logits, _ = model(jnp.asarray(ref['tokens']))
  assert np.max(np.abs(np.asarray(logits) - ref['logits'])) <= TOL
  assert spec.architecture == json.loads((HF / name / 'config.json').read_text())[
      'architectures'][0]


@pytest.mark.parametrize('name', ['llama'] + MOE)
def test_logits_match_on_a_data_by_expert_mesh(name):
  """Experts split over 'expert' (2 each), tokens over data x expert: the same logits."""
  ref = reference(name)
  mesh = make_mesh(2, 4)
  model, spec = hub.load_hf(HF / name, mesh=mesh)
  if spec.moe:
    wi = model.moe_layers()[max(model.moe_layers())].experts.wi[...]
    assert wi.sharding.spec[0] == 'expert'
    assert wi.addressable_shards[0].data.shape[0] == spec.moe.num_experts // 4
  tokens = np.tile(ref['tokens'], (4, 1))                   # 8 rows over 8 token shards
  with jax.set_mesh(mesh):
    logits = jax.jit(lambda m, t: m(t)[0])(model, tokens)
  assert np.max(np.abs(np.asarray(logits) - np.tile(ref['logits'], (4, 1, 1)))) <= TOL


def test_fused_and_per_expert_tensors_load_the_same_model():
  a, _ = hub.load_hf(HF / 'mixtral')
  b, _ = hub.load_hf(HF / 'mixtral_fused')
  pa, pb = params(a), params(b)
  assert pa.keys() == pb.keys()
  for k in pa:
    np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)


@pytest.mark.parametrize('name', FAMILIES)
def test_export_then_import_is_exact(name, tmp_path):
  model, spec = hub.load_hf(HF / name)
  out = hub.save_hf(model, spec, tmp_path / 'out', source=HF / name, max_shard_bytes=50_000)
  written = st.read_folder(out)
  assert len({e.file for e in written.values()}) > 1            # sharded, with an index
  assert (out / st.INDEX).exists()
  again, spec2 = hub.load_hf(out)
  assert spec2 == spec
  p, q = params(model), params(again)
  for k in p:
    np.testing.assert_array_equal(p[k], q[k], err_msg=k)
  # Written as transformers writes: one tensor per expert, its on-disk names.
  source = st.read_folder(HF / name)
  if name not in NOT_AS_WRITTEN:
    assert set(written) == set(source)
    assert all(written[n].shape == source[n].shape for n in source)
  config = json.loads((out / 'config.json').read_text())
  assert config['architectures'] == [spec.architecture]
  if name == 'llama':
    assert (out / 'tokenizer.json').read_bytes() == (HF / name / 'tokenizer.json').read_bytes()


def test_exporting_needs_an_architecture(tmp_path):
  from sparse_jax.config import base_config, model_spec
  from sparse_jax.models import TransformerLM
  c = base_config()
  c.model.update(d_model=32, num_layers=1, num_heads=2, d_ff=32)
  spec = model_spec(c)
  with pytest.raises(hub.HubError, match='model.architecture'):
    hub.save_hf(TransformerLM(spec, rngs=nnx.Rngs(0)), spec, tmp_path / 'out')
  assert not (tmp_path / 'out').exists()


# ---------------------------------------------------------------------- safetensors

def test_safetensors_round_trip_and_slices(tmp_path):
  rng = np.random.default_rng(0)
  arrays = {'a': rng.normal(size=(6, 5)).astype(np.float32),
            'b': rng.normal(size=(3,)).astype(jnp.bfloat16),
            'c': rng.normal(size=(2, 3, 4)).astype(np.float16)}
  tensors = [st.Tensor(k, v.shape, v.dtype, lambda v=v: v) for k, v in arrays.items()]
  names = st.write(tmp_path, tensors, max_shard_bytes=100)
  assert len(names) == 2 and (tmp_path / st.INDEX).exists()   # [a] [b, c]
  entries = st.read_folder(tmp_path)
  for k, v in arrays.items():
    np.testing.assert_array_equal(st.load(entries[k]), v)
  np.testing.assert_array_equal(st.load(entries['a'], (slice(2, 4), slice(1, 5))),
                                arrays['a'][2:4, 1:5])


def _copy(name, tmp_path) -> pathlib.Path:
  dst = tmp_path / name
  shutil.copytree(HF / name, dst)
  return dst


def _rewrite(folder: pathlib.Path, edit):
  """Rewrite model.safetensors with edit({name: array}) applied."""
  entries = st.read_folder(folder)
  arrays = edit({k: st.load(e) for k, e in entries.items()})
  (folder / 'model.safetensors').unlink()
  st.write(folder, [st.Tensor(k, v.shape, v.dtype, lambda v=v: v) for k, v in arrays.items()])


BAD = {
    'no config.json': (lambda d: (d / 'config.json').unlink(), 'has no config.json'),
    'unsupported architecture': (
        lambda d: _edit_config(d, architectures=['GPT2LMHeadModel']),
        r"GPT2LMHeadModel.*supported: LlamaForCausalLM, MistralForCausalLM"),
    'unsupported setting': (
        lambda d: _edit_config(d, rope_parameters={'rope_type': 'yarn', 'rope_theta': 1e4}),
        "config.json: rope_type='yarn'"),
    'truncated file': (
        lambda d: _truncate(d / 'model.safetensors'), 'model.safetensors is truncated'),
    'corrupt header': (
        lambda d: _corrupt(d / 'model.safetensors'), 'model.safetensors has a corrupt header'),
    'shape disagrees with config': (
        lambda d: _edit_config(d, intermediate_size=40),
        r'tensor model.layers.0.block_sparse_moe.experts.0.w1.weight has shape \[48, 32\], but '
        r'config.json makes it \[40, 32\]'),
    'missing tensor': (
        lambda d: _rewrite(d, lambda a: {k: v for k, v in a.items()
                                         if k != 'model.layers.1.self_attn.k_proj.weight'}),
        'tensor model.layers.1.self_attn.k_proj.weight is missing'),
    'unused tensor': (
        lambda d: _rewrite(d, lambda a: {**a, 'model.layers.0.mlp.extra.weight': a[
            'model.norm.weight']}),
        'tensor model.layers.0.mlp.extra.weight is used by nothing'),
}


def _edit_config(folder, **changes):
  c = json.loads((folder / 'config.json').read_text())
  (folder / 'config.json').write_text(json.dumps({**c, **changes}))


def _truncate(path):
  data = path.read_bytes()
  path.write_bytes(data[:len(data) - 100])


def _corrupt(path):
  data = bytearray(path.read_bytes())
  data[8:16] = b'\xff' * 8
  path.write_bytes(bytes(data))


@pytest.mark.parametrize('case', list(BAD))
def test_bad_folders_are_named_in_one_line(case, tmp_path):
  folder = _copy('mixtral', tmp_path)
  damage, message = BAD[case]
  damage(folder)
  with pytest.raises(hub.HubError, match=message) as e:
    hub.load_hf(folder)
  assert '\n' not in str(e.value)


def test_fp8_weights_dequantise_block_by_block(tmp_path):
  """A hand-made e4m3 weight [5, 3] in 2 x 2 blocks (the last row and column partial):
  each entry is its fp8 value times its own block's scale."""
  from sparse_jax.hub.loading import Fp8Entry
  w = np.array([[1, 2, 4], [0.5, -1, 8], [3, 0.25, -2], [1.5, 6, 1], [-4, 2, 0.5]],
               np.float32).astype(jnp.float8_e4m3fn)
  scale = np.array([[1, 10], [100, 1000], [0.5, 0.25]], np.float32)
  st.write(tmp_path, [st.Tensor('w', w.shape, w.dtype, lambda: w),
                      st.Tensor('w_scale_inv', scale.shape, scale.dtype, lambda: scale)])
  e = st.read_folder(tmp_path)
  entry = Fp8Entry(e['w'].file, e['w'].shape, e['w'], e['w_scale_inv'], (2, 2))
  want = np.array([[1, 2, 40], [0.5, -1, 80], [300, 25, -2000], [150, 600, 1000],
                   [-2, 1, 0.125]], np.float32)
  np.testing.assert_array_equal(entry.read(), want)
  np.testing.assert_array_equal(entry.read((slice(1, 4), slice(2, 3))), want[1:4, 2:3])


def test_extra_layers_past_the_model_are_skipped(tmp_path):
  """DeepSeek-V3 checkpoints carry multi-token-prediction layers past num_hidden_layers."""
  folder = _copy('deepseek_v3', tmp_path)
  _rewrite(folder, lambda a: {**a, 'model.layers.3.eh_proj.weight': a['model.norm.weight']})
  hub.load_hf(folder)


def test_parameter_counts_of_an_imported_model_by_hand():
  """qwen2_moe: 3 blocks (block 1 dense, width 64), 4 heads of 8 over 2 kv heads with
  q/k/v biases, 8 experts of width 16 (2 active), a gated shared expert of width 48."""
  from sparse_jax.analysis import accounting
  model, spec = hub.load_hf(HF / 'qwen2_moe')
  attention = 32 * 32 + 32 * 16 + 32 * 16 + 32 * 32 + (32 + 16 + 16) + 2 * 32  # + norms
  expert, shared, router = 3 * 32 * 16, 3 * 32 * 48 + 32, 32 * 8
  dense = 3 * 32 * 64
  total = 3 * attention + 2 * (8 * expert + shared + router) + dense + 32
  active = 3 * attention + 2 * (2 * expert + shared + router) + dense + 32
  got = accounting.params_from_model(model)
  assert (got['total'], got['active'], got['embedding']) == (total, active, 2 * 128 * 32)
  want = accounting.params_from_config(spec)
  assert (want['total'], want['active']) == (total, active)


@pytest.mark.slow
@pytest.mark.parametrize('name', FAMILIES)
def test_transformers_reads_the_export(name, tmp_path):
  """transformers' from_pretrained loads what save_hf wrote and computes the reference
  logits (needs torch and transformers, which the test extra does not install)."""
  pytest.importorskip('torch', reason='needs torch and transformers (pip install torch '
                      'transformers): not part of the test extra')
  pytest.importorskip('transformers', reason='needs transformers (pip install transformers)')
  import sys
  sys.path.insert(0, str(HF))
  from make_fixtures import hf_logits
  model, spec = hub.load_hf(HF / name)
  out = hub.save_hf(model, spec, tmp_path / 'out', source=HF / name)
  ref = reference(name)
  assert np.max(np.abs(hf_logits(out, ref['tokens']) - ref['logits'])) <= TOL


def test_a_repository_id_resolves_in_the_local_cache(tmp_path, monkeypatch):
  """'org/name' already in the Hugging Face cache loads offline; nothing is downloaded."""
  snapshot = tmp_path / 'models--tiny--olmoe' / 'snapshots' / ('0' * 40)
  shutil.copytree(HF / 'olmoe', snapshot)
  (tmp_path / 'models--tiny--olmoe' / 'refs').mkdir()
  (tmp_path / 'models--tiny--olmoe' / 'refs' / 'main').write_text('0' * 40)
  from huggingface_hub import constants
  monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path))   # read at call time
  from sparse_jax.hub.loading import folder_of
  assert folder_of('tiny/olmoe') == snapshot
  with pytest.raises(hub.HubError, match='not a folder'):
    hub.load_hf('tiny/not-cached')


@pytest.mark.parametrize('name', ['deepseek_v3', 'qwen2_moe'])
def test_one_shot_pruning_reaches_the_new_kernels(name):
  """Wanda on an imported model prunes the kernels the model names (latent attention's
  too) from the inputs its own layers report, and leaves biases, norms, routers and gates."""
  from sparse_jax.pruning import post_training
  model, spec = hub.load_hf(HF / name)
  masks = post_training.prune_model(model, reference(name)['tokens'][:, :64],
                                    method='wanda', sparsity=0.5)
  attn = {p[-1] for p in masks if p[2] == 'attn'}
  assert attn == ({'wq_a', 'wq_b', 'wkv_a', 'wkv_b', 'wo'} if spec.kv_lora_rank
                  else {'wq', 'wk', 'wv', 'wo'})
  assert all(0.45 <= float(np.mean(m)) <= 0.55 for m in masks.values())
  assert not any(k in p for p in masks for k in ('router', 'shared_gate', 'bq', 'scale'))
  assert any('experts' in p for p in masks)


def test_pruned_and_merged_experts_export_with_the_new_count(tmp_path):
  """Expert pruning as sparse_jax.compress does it (REAP scores, merge, compaction) on an
  imported OLMoE: the export has 4 experts and computes what the compacted model does."""
  import dataclasses
  from sparse_jax.models import TransformerLM
  from sparse_jax.pruning import compaction, experts
  model, spec = hub.load_hf(HF / 'olmoe')
  tokens = reference('olmoe')['tokens'][:, :64]
  kept = experts.choose(experts.expert_scores(model, tokens, 'reap'), 4, spec.moe.k)
  experts.merge_into_kept(model, kept, experts.expert_scores(model, tokens, 'frequency'))
  small_spec = dataclasses.replace(spec, moe=dataclasses.replace(spec.moe, num_experts=4))
  small = TransformerLM(small_spec, rngs=nnx.Rngs(0))
  nnx.update(small, compaction.compact_experts(nnx.state(model), kept))
  out = hub.save_hf(small, small_spec, tmp_path / 'out', source=HF / 'olmoe')
  assert json.loads((out / 'config.json').read_text())['num_experts'] == 4
  again, spec2 = hub.load_hf(out)
  assert spec2.moe.num_experts == 4
  np.testing.assert_array_equal(np.asarray(again(tokens)[0]), np.asarray(small(tokens)[0]))


def test_router_jitter_is_a_training_setting(tmp_path):
  """Mixtral's router_jitter_noise becomes moe.router_jitter (training only): the model
  loads with its jitter stream and evaluates as transformers does."""
  folder = _copy('mixtral', tmp_path)
  _edit_config(folder, router_jitter_noise=0.1)
  model, spec = hub.load_hf(folder)
  assert spec.moe.router_jitter == 0.1
  ref = reference('mixtral')
  assert np.max(np.abs(np.asarray(model(ref['tokens'])[0]) - ref['logits'])) <= TOL


@pytest.mark.parametrize('family', ['llama', 'qwen2_moe', 'olmoe', 'deepseek_v3', 'qwen3_moe'])
def test_every_parameter_of_an_imported_model_has_a_named_role(family):
  """The model names every parameter's role (none is 'other'), and the kernels its roles
  put in each pruning target are the ones the name-based default picks."""
  from sparse_jax import roles
  from sparse_jax.pruning.paths import default_prunable
  model, _ = hub.load_hf(HF / family)
  named = roles.param_roles(model)
  assert 'other' not in {r.kind for r in named.values()}
  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  picked = {t: {p for p, v in flat.items() if roles.prunable(named, t)(p, v[...])}
            for t in roles.TARGETS}
  assert picked['all'] == {p for p, v in flat.items() if default_prunable(p, v[...])}
  assert picked['attn'] == {p for p in picked['all'] if 'attn' in p}
  assert picked['ffn'] == picked['all'] - picked['attn']
  for p in picked['all']:                       # the input axis is the one x multiplies
    assert named[p].in_axis == flat[p][...].ndim - 2, p
