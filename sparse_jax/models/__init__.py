"""Language models built from sparse_jax layers."""
from sparse_jax.models.accounting import count_params, flops_per_token
from sparse_jax.models.transformer import TransformerLM, is_moe_block

__all__ = ['TransformerLM', 'count_params', 'flops_per_token', 'is_moe_block']
