"""Llama and Mistral, and the decoder layout every supported family shares.

config.json -> config keys: hidden_size d_model, intermediate_size d_ff,
num_attention_heads / num_key_value_heads / head_dim, rms_norm_eps, the RoPE base
(rope_parameters.rope_theta in transformers 5, rope_theta before), tie_word_embeddings;
hidden_act 'silu' is the SwiGLU FFN (gate_proj -> wi_gate, up_proj -> wi,
down_proj -> wo). Tensors: model.embed_tokens, model.layers.{i}.{input_layernorm,
self_attn.{q,k,v,o}_proj, post_attention_layernorm, mlp}, model.norm, lm_head.
What the model cannot compute (RoPE scaling, sliding windows, biases it does not have)
is refused by name, never approximated.
"""
from __future__ import annotations

from sparse_jax.hub.tensors import Fused, Linear, PerExpert, Same
from sparse_jax.specs import ModelSpec


class Unsupported(ValueError):
  """A config.json setting the model cannot compute; the message names the key."""


class Decoder:
  """A Llama-style decoder. Families override moe_config / ffn_tensors / attention
  extras and the config fields they own."""
  architecture = 'LlamaForCausalLM'
  model_type = 'llama'
  qk_norm = 'none'               # 'head' or 'proj' for families with q/k norms

  # ------------------------------------------------------------ config.json -> config
  def config(self, hf: dict) -> dict:
    """{dotted config key: value}: the model of config.json (Unsupported if it cannot
    be computed)."""
    self.check(hf)
    heads = hf['num_attention_heads']
    return {'model.vocab_size': hf['vocab_size'], 'model.d_model': hf['hidden_size'],
            'model.num_layers': hf['num_hidden_layers'], 'model.num_heads': heads,
            'model.num_kv_heads': hf.get('num_key_value_heads') or heads,
            'model.head_dim': hf.get('head_dim') or hf['hidden_size'] // heads,
            'model.d_ff': hf['intermediate_size'], 'model.activation': 'swiglu',
            'model.tie_embeddings': bool(hf.get('tie_word_embeddings', False)),
            'model.rope_theta': float(rope_theta(hf)),
            'model.norm_eps': float(hf.get('rms_norm_eps', 1e-6)),
            'model.qk_norm': self.qk_norm, 'model.qkv_bias': self.qkv_bias(hf),
            'model.architecture': self.architecture, **self.moe_config(hf)}

  def check(self, hf: dict) -> None:
    if hf.get('hidden_act', 'silu') != 'silu':
      raise Unsupported(f"hidden_act={hf['hidden_act']!r}: only 'silu' (SwiGLU) is "
                        'supported')
    for key in ('attention_bias', 'mlp_bias'):
      if hf.get(key):
        raise Unsupported(f'{key}=true is not supported (the model has no biases there)')
    window = hf.get('sliding_window') if hf.get('use_sliding_window', True) else None
    if window or 'sliding_attention' in (hf.get('layer_types') or ()):
      raise Unsupported(f'sliding_window={window}: sliding-window attention is not '
                        'supported; set "sliding_window": null in config.json if every '
                        'sequence you run is shorter than the window')

  def qkv_bias(self, hf: dict) -> bool:
    return False

  def moe_config(self, hf: dict) -> dict:
    return {}

  # ------------------------------------------------------------- parameters <-> tensors
  def tensors(self, spec: ModelSpec, present: frozenset = frozenset()) -> dict:
    """{parameter path 'blocks/0/attn/wq': Source}. `present` (the folder's tensor names)
    picks fused expert tensors where the folder has them; exports use per-expert names."""
    t = {'embed': Same('model.embed_tokens.weight'), 'final_norm/scale': Same('model.norm.weight')}
    if not spec.tie_embeddings:
      t['unembed'] = Linear('lm_head.weight')
    for i in range(spec.num_layers):
      ours, theirs = f'blocks/{i}', f'model.layers.{i}'
      t[f'{ours}/attn_norm/scale'] = Same(f'{theirs}.input_layernorm.weight')
      t[f'{ours}/ffn_norm/scale'] = Same(f'{theirs}.post_attention_layernorm.weight')
      t.update(self.attention_tensors(spec, f'{ours}/attn', f'{theirs}.self_attn'))
      t.update(self.ffn_tensors(spec, i, f'{ours}/ffn', f'{theirs}.mlp', present))
    return t

  def attention_tensors(self, spec: ModelSpec, ours: str, theirs: str) -> dict:
    t = {}
    for w, name in (('q', 'q_proj'), ('k', 'k_proj'), ('v', 'v_proj'), ('o', 'o_proj')):
      t[f'{ours}/w{w}'] = Linear(f'{theirs}.{name}.weight')
      if spec.qkv_bias and w != 'o':
        t[f'{ours}/b{w}'] = Same(f'{theirs}.{name}.bias')
    if spec.qk_norm != 'none':
      for w in 'qk':
        t[f'{ours}/{w}_norm/scale'] = Same(f'{theirs}.{w}_norm.weight')
    return t

  def ffn_tensors(self, spec: ModelSpec, i: int, ours: str, theirs: str,
                  present: frozenset) -> dict:
    return swiglu(ours, theirs)

  def skipped(self, hf: dict, name: str) -> bool:
    """A tensor of the folder that is not part of the model (and not an error)."""
    return name.endswith('.rotary_emb.inv_freq')       # some exports carry the buffer

  # ------------------------------------------------------------ config -> config.json
  def hf_config(self, spec: ModelSpec) -> dict:
    """The config.json fields the model determines (the rest come from the source
    folder's config.json, or transformers' defaults)."""
    return {'architectures': [self.architecture], 'model_type': self.model_type,
            'vocab_size': spec.vocab_size, 'hidden_size': spec.d_model,
            'intermediate_size': spec.d_ff, 'num_hidden_layers': spec.num_layers,
            'num_attention_heads': spec.num_heads, 'num_key_value_heads': spec.kv_heads,
            'head_dim': spec.head_dim, 'hidden_act': 'silu', 'rms_norm_eps': spec.norm_eps,
            'rope_theta': spec.rope_theta,
            'rope_parameters': {'rope_type': 'default', 'rope_theta': spec.rope_theta},
            'rope_scaling': None, 'tie_word_embeddings': spec.tie_embeddings,
            **self.hf_extra(spec)}

  def hf_extra(self, spec: ModelSpec) -> dict:
    """The family's own config.json fields."""
    return {'attention_bias': False, 'mlp_bias': False}


class Mistral(Decoder):
  architecture = 'MistralForCausalLM'
  model_type = 'mistral'

  def hf_extra(self, spec: ModelSpec) -> dict:
    return {'sliding_window': None}


def rope_theta(hf: dict) -> float:
  """The RoPE base; a scaled RoPE (yarn, llama3, linear, ...) is Unsupported."""
  params = hf.get('rope_parameters') or {}
  scaling = hf.get('rope_scaling') or {}
  kind = params.get('rope_type', scaling.get('rope_type', scaling.get('type', 'default')))
  if kind != 'default':
    raise Unsupported(f'rope_type={kind!r}: only the default RoPE is supported')
  return params.get('rope_theta', hf.get('rope_theta', 10_000.0))


def swiglu(ours: str, theirs: str) -> dict:
  """A dense SwiGLU FFN: gate_proj, up_proj, down_proj."""
  return {f'{ours}/wi_gate': Linear(f'{theirs}.gate_proj.weight'),
          f'{ours}/wi': Linear(f'{theirs}.up_proj.weight'),
          f'{ours}/wo': Linear(f'{theirs}.down_proj.weight')}


def experts(ours: str, theirs: str, num_experts: int, present: frozenset,
            names=('gate_proj', 'up_proj', 'down_proj')) -> dict:
  """Stacked SwiGLU experts under `theirs` (e.g. model.layers.1.mlp.experts): fused
  gate_up_proj [E, 2F, D] and down_proj [E, D, F] where the folder has them, else one
  tensor per expert, {theirs}.{j}.{gate,up,down}.weight with `names`."""
  if f'{theirs}.gate_up_proj' in present:
    return {f'{ours}/wi_gate': Fused(f'{theirs}.gate_up_proj', 0, 2),
            f'{ours}/wi': Fused(f'{theirs}.gate_up_proj', 1, 2),
            f'{ours}/wo': Fused(f'{theirs}.down_proj')}
  each = lambda name: PerExpert(tuple(f'{theirs}.{j}.{name}.weight'
                                      for j in range(num_experts)))
  gate, up, down = names
  return {f'{ours}/wi_gate': each(gate), f'{ours}/wi': each(up), f'{ours}/wo': each(down)}


def moe_keys(hf: dict, *, num_experts: int, d_ff: int, normalize: bool, every: int = 1,
             offset: int = 0, dense: tuple = (), shared_d_ff: int = 0,
             shared_gate: bool = False) -> dict:
  """The moe.* keys of an imported MoE: dropless routing, as these models were trained."""
  return {'moe.num_experts': num_experts, 'moe.k': hf['num_experts_per_tok'],
          'moe.d_ff': d_ff, 'moe.dispatch': 'dropless', 'moe.normalize_weights': normalize,
          'moe.moe_every': every, 'moe.moe_offset': offset,
          'moe.dense_layers': ','.join(str(i) for i in sorted(dense)),
          'moe.shared_d_ff': shared_d_ff, 'moe.shared_gate': shared_gate,
          'moe.router_jitter': float(hf.get('router_jitter_noise') or 0.0),
          'moe.load_balance_coef': float(hf.get('router_aux_loss_coef') or 0.0),
          'moe.z_loss_coef': float(hf.get('router_z_loss_coef') or 0.0)}


def moe_layers(spec: ModelSpec) -> dict:
  """config.json's description of which blocks are MoE, in Qwen's terms
  (decoder_sparse_step, mlp_only_layers), for the layout ModelSpec.is_moe_block gives."""
  m = spec.moe
  step = m.moe_every
  if m.moe_offset != step - 1:            # Qwen's rule is (i + 1) % step == 0
    step = 1
  dense = [i for i in range(spec.num_layers) if not spec.is_moe_block(i)
           and (i + 1) % step == 0]
  return {'decoder_sparse_step': step, 'mlp_only_layers': dense}
