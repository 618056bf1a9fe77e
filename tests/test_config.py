"""validate(): every cross-field constraint, one sentence naming key, value and fix."""
import pathlib

import pytest

import dataclasses

from sparse_jax.config import ConfigError, base_config, from_saved, load_config, resolve, validate

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / 'configs'


@pytest.mark.parametrize('name', ['base', 'dense', 'switch', 'top2', 'tiny'])
def test_shipped_configs_are_valid(name):
  validate(load_config(CONFIGS / f'{name}.py'), num_devices=8)


def test_switch_and_top2_are_what_they_say():
  s, t = load_config(CONFIGS / 'switch.py'), load_config(CONFIGS / 'top2.py')
  assert (s.moe.num_experts, s.moe.k, s.moe.capacity_factor, s.moe.moe_every) == (8, 1, 1.25, 2)
  assert s.model.init_scale == 0.1 and t.moe.k == 2


@pytest.mark.parametrize('key,value,devices,words', [
    ('moe.num_experts', 6, 8, ['moe.num_experts=6', 'mesh.expert=4']),
    ('moe.k', 9, 8, ['moe.k=9', 'moe.num_experts=8']),
    ('train.batch_size', 6, 8, ['train.batch_size=6', '8']),
    ('train.seq_len', 0, 8, ['train.seq_len=0', '>= 1']),
    ('moe.dispatch', 'scatter', 8, ["moe.dispatch='scatter'", 'index']),
    ('mesh.data', 3, 8, ['mesh.data/expert/model', 'there are 8 devices']),
    ('moe.capacity_factor', 0.0, 8, ['moe.capacity_factor=0.0', '> 0']),
    ('moe.routing', 'expert_choice', 8, ['allow_lookahead']),
    ('data.source', 'hub:x', 8, ["data.source='hub:x'", 'tfds:NAME']),
    ('model.num_heads', 3, 8, ['model.d_model=256', 'model.num_heads=3']),
    ('moe.ep_transport', 'nccl', 8, ["moe.ep_transport='nccl'", 'all_gather']),
    ('moe.block_size', 0, 8, ['moe.block_size=0', 'positive']),
    ('moe.grouped_matmul', 'mega', 8, ["moe.grouped_matmul='mega'", 'blocked']),
    ('moe.ep_transport', 'ragged', 8, ["moe.ep_transport='ragged'", 'XLA:CPU']),
])
def test_errors_name_key_value_and_fix(key, value, devices, words):
  c = load_config(CONFIGS / 'switch.py')
  c.mesh.data, c.mesh.expert = -1, 4
  section, name = key.split('.')
  c[section][name] = value
  with pytest.raises(ConfigError) as err:
    validate(c, num_devices=devices)
  msg = str(err.value)
  assert '\n' not in msg
  for w in words:
    assert w in msg, (w, msg)


def test_dropless_expert_choice_is_refused():
  c = load_config(CONFIGS / 'switch.py')
  c.moe.dispatch, c.moe.routing, c.moe.allow_lookahead = 'dropless', 'expert_choice', True
  with pytest.raises(ConfigError, match=r"moe.dispatch='dropless' serves moe.routing='top_k'"):
    validate(c, num_devices=8)


def test_pruning_targets_is_checked_when_pruning_is_on():
  c = load_config(CONFIGS / 'dense.py')
  c.pruning.targets = 'mlp'
  validate(c, num_devices=8)                          # pruning off: not read
  c.pruning.sparsity = 0.5
  with pytest.raises(ConfigError, match=r"pruning.targets='mlp' must be one of \('all', 'ffn', 'attn'\)"):
    validate(c, num_devices=8)


def test_neuron_ablation_needs_constant_fan_in_and_gradient_regrowth():
  c = load_config(CONFIGS / 'dense.py')
  c.pruning.update(sparsity=0.8, schedule='dynamic', min_salient=0.3)
  with pytest.raises(ConfigError, match=r"pruning.min_salient=0.3 .* got fan_in='any'"):
    validate(c, num_devices=8)
  c.pruning.fan_in = 'constant'
  validate(c, num_devices=8)
  assert resolve(c, 8).pruning.wrap_kwargs(4)['min_salient'] == 0.3


def test_resolve_fills_every_default_once():
  c = load_config(CONFIGS / 'top2.py')
  c.mesh.data, c.mesh.expert = -1, 4
  spec = resolve(c, num_devices=8)
  m = spec.model
  assert spec.mesh == {'data': 2, 'expert': 4, 'model': 1}
  assert m.head_dim == c.model.d_model // c.model.num_heads
  assert m.moe.d_ff == c.model.d_ff and m.moe.group_size is None
  assert m.moe.normalize_weights is True                   # k = 2
  assert m.moe.init_scale == m.moe.router_init_scale == c.model.init_scale == 0.1
  assert m.moe.expert_compute is None                      # 'auto': chosen where it runs
  assert [m.is_moe_block(i) for i in range(4)] == [False, True, False, True]
  assert spec.train.lr_decay_steps == c.train.steps and spec.pruning is None
  c.pruning.sparsity, c.moe.router_init_scale, c.moe.k = 0.5, 0.01, 1
  spec = resolve(c, num_devices=8)
  assert spec.pruning.end_step == 3 * c.train.steps // 4 and spec.pruning.n_m is None
  assert spec.model.moe.router_init_scale == 0.01 and spec.model.moe.normalize_weights is False
  with pytest.raises(dataclasses.FrozenInstanceError):
    spec.model.d_model = 3
  assert resolve(load_config(CONFIGS / 'dense.py'), num_devices=8).model.moe is None
  with pytest.raises(ConfigError, match='moe.k=9'):
    c.moe.k = 9
    resolve(c, num_devices=8)


def test_saved_configs_read_back_with_new_keys_defaulted():
  saved = load_config(CONFIGS / 'switch.py').to_dict()
  del saved['moe']['router_init_scale']                    # a checkpoint from before the key
  c = from_saved(saved)
  assert c.moe.router_init_scale == base_config().moe.router_init_scale
  assert c.moe.num_experts == 8
  with pytest.raises(ConfigError, match="'moe.nope'"):
    from_saved({'moe': {'nope': 1}})


def test_model_spec_round_trips_as_versioned_json():
  import json
  from sparse_jax.config import model_spec
  from sparse_jax.specs import SPEC_VERSION, ModelSpec, SpecError
  c = load_config(pathlib.Path(__file__).parents[1] / 'configs' / 'tiny.py')
  c.moe.dense_layers = '0'
  spec = model_spec(c)
  record = json.loads(json.dumps(spec.to_json()))           # what a checkpoint stores
  assert record['version'] == SPEC_VERSION and record['moe']['dense_layers'] == [0]
  assert ModelSpec.from_json(record) == spec
  dense = model_spec(base_config())
  assert dense.moe is None and ModelSpec.from_json(dense.to_json()) == dense
  # A record from before a field existed loads with that field's default.
  old = dict(record)
  del old['rope_interleave']
  assert ModelSpec.from_json(old) == spec
  with pytest.raises(SpecError, match=f'version {SPEC_VERSION + 1}.*upgrade sparse_jax'):
    ModelSpec.from_json({**record, 'version': SPEC_VERSION + 1})
  with pytest.raises(SpecError, match=r"fields \['sliding_window'\] that ModelSpec lacks"):
    ModelSpec.from_json({**record, 'sliding_window': 4096})
