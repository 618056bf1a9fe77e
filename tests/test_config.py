"""validate(): every cross-field constraint, one sentence naming key, value and fix."""
import pathlib

import pytest

from sparse_jax.config import ConfigError, load_config, validate

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
    ('mesh.data', 3, 8, ['multiply to the 8 devices']),
    ('moe.capacity_factor', 0.0, 8, ['moe.capacity_factor=0.0', '> 0']),
    ('moe.routing', 'expert_choice', 8, ['allow_lookahead']),
    ('data.source', 'hub:x', 8, ["data.source='hub:x'", 'tfds:NAME']),
    ('model.num_heads', 3, 8, ['model.d_model=256', 'model.num_heads=3']),
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


def test_pruning_targets_is_checked_when_pruning_is_on():
  c = load_config(CONFIGS / 'dense.py')
  c.pruning.targets = 'mlp'
  validate(c, num_devices=8)                          # pruning off: not read
  c.pruning.sparsity = 0.5
  with pytest.raises(ConfigError, match="pruning.targets='mlp' must be 'all', 'ffn' or 'attn'"):
    validate(c, num_devices=8)
