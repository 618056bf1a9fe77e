"""Pruning: masks, scorers, schedules, N:M, structured groups, the optax wrapper, compaction.

    tx = sparse_jax.pruning.wrap(optax.adamw(1e-3), sparsity=0.9, schedule='gmp',
                                 start_step=0, end_step=10_000, update_every=100)
    sparse_jax.pruning.masks(opt_state)   # params-shaped bool masks, None if not pruned

Where to add things: a scorer in scores.py (METHODS), a schedule in schedule.py, a
layer distribution in distribution.py, a structured group in structured.py.
"""
from sparse_jax.pruning import compaction, paths
from sparse_jax.pruning.distribution import DISTRIBUTIONS, erk_densities, zeros_per_layer
from sparse_jax.pruning.masking import n_m_mask, prune_lowest, sparsity_mask
from sparse_jax.pruning.paths import TARGETS, default_prunable, plain_path
from sparse_jax.pruning.schedule import SCHEDULES, gmp_sparsity, target_sparsity, update_steps
from sparse_jax.pruning.scores import METHODS, element_scores
from sparse_jax.pruning.structured import KINDS as STRUCTURE_KINDS
from sparse_jax.pruning.structured import group_scores, structured_masks
from sparse_jax.pruning.wrapper import SCOPES, PruneState, masks, wrap

__all__ = [
    'DISTRIBUTIONS', 'METHODS', 'SCHEDULES', 'SCOPES', 'STRUCTURE_KINDS', 'TARGETS',
    'PruneState', 'compaction', 'default_prunable', 'element_scores', 'erk_densities',
    'gmp_sparsity', 'group_scores', 'masks', 'n_m_mask', 'paths', 'plain_path',
    'prune_lowest', 'sparsity_mask', 'structured_masks', 'target_sparsity', 'update_steps',
    'wrap', 'zeros_per_layer',
]
