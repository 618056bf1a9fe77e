"""Mixtral: every block's FFN is top-k of num_local_experts SwiGLU experts, softmax over
all experts then renormalised over the chosen k.

Tensors beyond the Llama layout: model.layers.{i}.block_sparse_moe.gate (the router,
[E, D]) and block_sparse_moe.experts.{j}.w1 / w3 / w2 (gate, up, down), as transformers
writes them; or the fused mlp.gate, mlp.experts.gate_up_proj / down_proj it holds in
memory.
"""
from __future__ import annotations

from sparse_jax.hub.llama import Decoder, experts, moe_keys
from sparse_jax.hub.tensors import Linear
from sparse_jax.specs import ModelSpec


class Mixtral(Decoder):
  architecture = 'MixtralForCausalLM'
  model_type = 'mixtral'

  def moe_config(self, hf: dict) -> dict:
    return moe_keys(hf, num_experts=hf['num_local_experts'], d_ff=hf['intermediate_size'],
                    normalize=True)

  def ffn_tensors(self, spec: ModelSpec, i: int, ours: str, theirs: str,
                  present: frozenset) -> dict:
    layer = theirs.rsplit('.', 1)[0]                       # model.layers.{i}
    fused = f'{layer}.mlp.experts.gate_up_proj' in present
    moe = f'{layer}.mlp' if fused else f'{layer}.block_sparse_moe'
    return {f'{ours}/router/kernel': Linear(f'{moe}.gate.weight'),
            **experts(f'{ours}/experts', f'{moe}.experts', spec.moe.num_experts, present,
                      names=('w1', 'w3', 'w2'))}

  def hf_extra(self, spec: ModelSpec) -> dict:
    m = spec.moe
    return {'num_local_experts': m.num_experts, 'num_experts_per_tok': m.k,
            'intermediate_size': m.d_ff, 'router_aux_loss_coef': m.load_balance_coef,
            'router_jitter_noise': m.router_jitter, 'sliding_window': None}
