"""Language models built from sparse_jax layers."""
from sparse_jax.models.transformer import Block, TransformerLM, relayout

__all__ = ['Block', 'TransformerLM', 'relayout']
