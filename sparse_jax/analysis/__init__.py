"""Analysis of trained models: activation-sparsity probes and parameter/FLOP accounting."""
from sparse_jax.analysis import accounting, activations

__all__ = ['accounting', 'activations']
