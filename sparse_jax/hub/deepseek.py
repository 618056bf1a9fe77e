"""DeepSeek-V3: multi-head latent attention (sparse_jax.mla), the first
first_k_dense_replace blocks dense, then n_routed_experts SwiGLU experts chosen by
sigmoid scores plus a selection-only correction bias, group-limited (the topk_group of
n_group groups with the best two-expert sums), the chosen weights renormalised
(norm_topk_prob) and scaled by routed_scaling_factor, and n_shared_experts always-on
experts summed without a gate. The correction bias is the loss-free balancing bias
(moe.balancing='loss_free'), so fine-tuning updates it as DeepSeek-V3 was trained.

Tensors beyond the Llama layout: self_attn.{q_a_proj, q_a_layernorm, q_b_proj (q_proj
without a q latent), kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj}, mlp.gate.weight,
mlp.gate.e_score_correction_bias, mlp.experts.*, mlp.shared_experts.*. The
multi-token-prediction layers some checkpoints carry (model.layers.{N} and above,
num_nextn_predict_layers) are not part of the causal LM and are skipped.
"""
from __future__ import annotations

import re

from sparse_jax.hub.llama import Decoder, Unsupported, experts, moe_keys, swiglu
from sparse_jax.hub.tensors import Linear, Same
from sparse_jax.specs import ModelSpec

_LAYER = re.compile(r'model\.layers\.(\d+)\.')


class DeepseekV3(Decoder):
  architecture = 'DeepseekV3ForCausalLM'
  model_type = 'deepseek_v3'

  def check(self, hf: dict) -> None:
    super().check(hf)
    for key, want in (('topk_method', 'noaux_tc'), ('scoring_func', 'sigmoid'),
                      ('moe_layer_freq', 1)):
      if hf.get(key, want) != want:
        raise Unsupported(f'{key}={hf[key]!r}: only {want!r} is supported')

  def config(self, hf: dict) -> dict:
    c = super().config({**hf, 'head_dim': hf['qk_nope_head_dim'] + hf['qk_rope_head_dim'],
                        'num_key_value_heads': hf['num_attention_heads']})
    c.update({'model.num_kv_heads': 0, 'model.q_lora_rank': hf.get('q_lora_rank') or 0,
              'model.kv_lora_rank': hf['kv_lora_rank'],
              'model.qk_nope_head_dim': hf['qk_nope_head_dim'],
              'model.qk_rope_head_dim': hf['qk_rope_head_dim'],
              'model.v_head_dim': hf['v_head_dim'],
              'model.rope_interleave': bool(hf.get('rope_interleave', True))})
    return c

  def moe_config(self, hf: dict) -> dict:
    return {**moe_keys(hf, num_experts=hf['n_routed_experts'], d_ff=hf['moe_intermediate_size'],
                       normalize=bool(hf.get('norm_topk_prob', True)),
                       offset=hf.get('first_k_dense_replace', 0),
                       shared_d_ff=hf.get('n_shared_experts', 0) * hf['moe_intermediate_size']),
            'moe.router_score': 'sigmoid', 'moe.n_group': hf.get('n_group', 1),
            'moe.topk_group': hf.get('topk_group', 1),
            'moe.routed_scale': float(hf.get('routed_scaling_factor', 1.0)),
            'moe.balancing': 'loss_free', 'moe.bias_rate': 1e-3}

  def skipped(self, hf: dict, name: str) -> bool:
    m = _LAYER.match(name)
    return bool(m) and int(m.group(1)) >= hf['num_hidden_layers']

  def attention_tensors(self, spec: ModelSpec, ours: str, theirs: str) -> dict:
    t = {f'{ours}/wkv_a': Linear(f'{theirs}.kv_a_proj_with_mqa.weight'),
         f'{ours}/kv_a_norm/scale': Same(f'{theirs}.kv_a_layernorm.weight'),
         f'{ours}/wkv_b': Linear(f'{theirs}.kv_b_proj.weight'),
         f'{ours}/wo': Linear(f'{theirs}.o_proj.weight')}
    if spec.q_lora_rank:
      t.update({f'{ours}/wq_a': Linear(f'{theirs}.q_a_proj.weight'),
                f'{ours}/q_a_norm/scale': Same(f'{theirs}.q_a_layernorm.weight'),
                f'{ours}/wq_b': Linear(f'{theirs}.q_b_proj.weight')})
    else:
      t[f'{ours}/wq'] = Linear(f'{theirs}.q_proj.weight')
    return t

  def ffn_tensors(self, spec: ModelSpec, i: int, ours: str, theirs: str,
                  present: frozenset) -> dict:
    if not spec.is_moe_block(i):
      return swiglu(ours, theirs)
    t = {f'{ours}/router/kernel': Linear(f'{theirs}.gate.weight'),
         f'{ours}/router/bias': Same(f'{theirs}.gate.e_score_correction_bias'),
         **experts(f'{ours}/experts', f'{theirs}.experts', spec.moe.num_experts, present)}
    if spec.moe.shared_d_ff:
      t.update(swiglu(f'{ours}/shared', f'{theirs}.shared_experts'))
    return t

  def hf_config(self, spec: ModelSpec) -> dict:
    m = spec.moe
    out = super().hf_config(spec)
    out.update(head_dim=spec.qk_rope_head_dim, num_key_value_heads=spec.num_heads,
               q_lora_rank=spec.q_lora_rank or None, kv_lora_rank=spec.kv_lora_rank,
               qk_nope_head_dim=spec.qk_nope_head_dim, qk_rope_head_dim=spec.qk_rope_head_dim,
               qk_head_dim=spec.qk_nope_head_dim + spec.qk_rope_head_dim,
               v_head_dim=spec.v_head_dim, rope_interleave=spec.rope_interleave,
               n_routed_experts=m.num_experts, num_experts_per_tok=m.k,
               moe_intermediate_size=m.d_ff, n_shared_experts=m.shared_d_ff // m.d_ff,
               first_k_dense_replace=m.moe_offset, n_group=m.n_group, topk_group=m.topk_group,
               routed_scaling_factor=m.routed_scale, norm_topk_prob=m.normalize_weights,
               topk_method='noaux_tc', num_nextn_predict_layers=0, attention_bias=False)
    return out

  def hf_extra(self, spec: ModelSpec) -> dict:
    return {}
