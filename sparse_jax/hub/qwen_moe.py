"""Qwen2-MoE and Qwen3-MoE: softmax top-k experts (renormalised when norm_topk_prob),
dense blocks where mlp_only_layers or decoder_sparse_step say.

Block i is MoE when i is not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0,
i.e. moe_offset = step - 1, moe_every = step, dense_layers = mlp_only_layers. Qwen2-MoE
adds biases on q, k, v (qkv_bias) and a shared expert of width
shared_expert_intermediate_size scaled by sigmoid(shared_expert_gate(x)); Qwen3-MoE an
RMSNorm over each head of q and k, before RoPE. Tensors beyond the Llama layout:
mlp.gate ([E, D] router), mlp.experts.{j}.{gate,up,down}_proj (or the fused
mlp.experts.gate_up_proj / down_proj), mlp.shared_expert.*, mlp.shared_expert_gate,
self_attn.{q,k}_norm.
"""
from __future__ import annotations

from sparse_jax.hub.llama import Decoder, experts, moe_keys, moe_layers, swiglu
from sparse_jax.hub.tensors import Linear
from sparse_jax.specs import ModelSpec


class Qwen2Moe(Decoder):
  architecture = 'Qwen2MoeForCausalLM'
  model_type = 'qwen2_moe'
  shared = True

  def qkv_bias(self, hf: dict) -> bool:
    return bool(hf.get('qkv_bias', True))

  def moe_config(self, hf: dict) -> dict:
    step = hf.get('decoder_sparse_step', 1)
    shared = hf.get('shared_expert_intermediate_size', 0) if self.shared else 0
    # transformers 5 writes Qwen3-MoE's count as num_local_experts, the Hub's as num_experts
    n = hf.get('num_experts') or hf['num_local_experts']
    return moe_keys(hf, num_experts=n, d_ff=hf['moe_intermediate_size'],
                    normalize=bool(hf.get('norm_topk_prob', False)), every=step,
                    offset=step - 1, dense=tuple(hf.get('mlp_only_layers') or ()),
                    shared_d_ff=shared, shared_gate=bool(shared))

  def ffn_tensors(self, spec: ModelSpec, i: int, ours: str, theirs: str,
                  present: frozenset) -> dict:
    if not spec.is_moe_block(i):
      return swiglu(ours, theirs)
    t = {f'{ours}/router/kernel': Linear(f'{theirs}.gate.weight'),
         **experts(f'{ours}/experts', f'{theirs}.experts', spec.moe.num_experts, present)}
    if spec.moe.shared_d_ff:
      t.update(swiglu(f'{ours}/shared', f'{theirs}.shared_expert'))
      t[f'{ours}/shared_gate'] = Linear(f'{theirs}.shared_expert_gate.weight')
    return t

  def hf_extra(self, spec: ModelSpec) -> dict:
    m = spec.moe
    out = {'num_experts': m.num_experts, 'num_experts_per_tok': m.k,
           'moe_intermediate_size': m.d_ff, 'norm_topk_prob': m.normalize_weights,
           'router_aux_loss_coef': m.load_balance_coef, 'use_sliding_window': False,
           **moe_layers(spec)}
    if self.shared:
      out.update(shared_expert_intermediate_size=m.shared_d_ff, qkv_bias=spec.qkv_bias)
    return out


class Qwen3Moe(Qwen2Moe):
  architecture = 'Qwen3MoeForCausalLM'
  model_type = 'qwen3_moe'
  qk_norm = 'head'
  shared = False

  def qkv_bias(self, hf: dict) -> bool:
    return False                  # Qwen3's attention_bias would also bias o_proj: refused

  def hf_extra(self, spec: ModelSpec) -> dict:
    # transformers 5 writes the count as num_local_experts, the published configs as
    # num_experts: both, so that neither a source's key nor a reader's is stale.
    out = super().hf_extra(spec)
    return {**out, 'num_local_experts': out['num_experts']}
