"""OLMoE: every block's FFN is top-k of num_experts SwiGLU experts (softmax over all,
renormalised only when norm_topk_prob), and q and k each pass an RMSNorm over the whole
projection before RoPE. Tensors beyond the Llama layout: self_attn.{q,k}_norm,
mlp.gate ([E, D] router), mlp.experts.{j}.{gate,up,down}_proj (or the fused
mlp.experts.gate_up_proj / down_proj).
"""
from __future__ import annotations

from sparse_jax.hub.llama import Decoder, Unsupported, experts, moe_keys
from sparse_jax.hub.tensors import Linear
from sparse_jax.specs import ModelSpec


class Olmoe(Decoder):
  architecture = 'OlmoeForCausalLM'
  model_type = 'olmoe'
  qk_norm = 'proj'

  def check(self, hf: dict) -> None:
    super().check(hf)
    head_dim = hf.get('head_dim')
    if head_dim and head_dim * hf['num_attention_heads'] != hf['hidden_size']:
      raise Unsupported(f'head_dim={head_dim}: OLMoE sizes its q/k norms by hidden_size, so '
                        'head_dim must be hidden_size / num_attention_heads')

  def config(self, hf: dict) -> dict:
    return {**super().config(hf), 'model.qkv_clip': float(hf.get('clip_qkv') or 0.0)}

  def moe_config(self, hf: dict) -> dict:
    return moe_keys(hf, num_experts=hf['num_experts'], d_ff=hf['intermediate_size'],
                    normalize=bool(hf.get('norm_topk_prob', False)))

  def ffn_tensors(self, spec: ModelSpec, i: int, ours: str, theirs: str,
                  present: frozenset) -> dict:
    return {f'{ours}/router/kernel': Linear(f'{theirs}.gate.weight'),
            **experts(f'{ours}/experts', f'{theirs}.experts', spec.moe.num_experts, present)}

  def hf_extra(self, spec: ModelSpec) -> dict:
    m = spec.moe
    return {'num_experts': m.num_experts, 'num_experts_per_tok': m.k,
            'intermediate_size': m.d_ff, 'norm_topk_prob': m.normalize_weights,
            'router_aux_loss_coef': m.load_balance_coef,
            'router_z_loss_coef': m.z_loss_coef, 'clip_qkv': spec.qkv_clip or None,
            'attention_bias': False}
