"""Pruning: masks, scorers, schedules, N:M, structured groups, the optax wrapper, compaction.

    tx = sparse_jax.pruning.wrap(optax.adamw(1e-3), sparsity=0.9, schedule='gmp',
                                 start_step=0, end_step=10_000, update_every=100)
    sparse_jax.pruning.masks(opt_state)   # params-shaped bool masks, None if not pruned

    tx = sparse_jax.pruning.wrap(optax.adamw(1e-3), sparsity=0.9, schedule='dynamic',
                                 end_step=7_500, regrow='gradient', fan_in='constant')

One-shot pruning of a trained model: oneshot.py (magnitude, Wanda, SparseGPT of one
kernel from calibration inputs), post_training.py (a whole TransformerLM, block by block),
experts.py (score, keep and merge MoE experts), compaction.py (the smaller model),
condensed.py (a constant fan-in layer stored as [K, out] values and indices).

Where to add things: a scorer in scores.py (METHODS), a schedule in schedule.py, a
layer distribution in distribution.py, a structured group in structured.py, a regrowth
rule in dynamic.py.
"""
from sparse_jax.pruning import compaction, condensed, experts, oneshot, paths, post_training
from sparse_jax.pruning.condensed import CondensedLinear, condense, condensed_matmul
from sparse_jax.pruning.distribution import DISTRIBUTIONS, erk_densities, zeros_per_layer
from sparse_jax.pruning.dynamic import FAN_IN, REGROW
from sparse_jax.pruning.masking import n_m_mask, prune_lowest, sparsity_mask
from sparse_jax.pruning.oneshot import magnitude, sparsegpt, wanda
from sparse_jax.pruning.paths import default_prunable, plain_path
from sparse_jax.roles import TARGETS
from sparse_jax.pruning.schedule import SCHEDULES, gmp_sparsity, target_sparsity, update_steps
from sparse_jax.pruning.scores import METHODS, element_scores
from sparse_jax.pruning.structured import KINDS as STRUCTURE_KINDS
from sparse_jax.pruning.structured import group_scores, structured_masks
from sparse_jax.pruning.wrapper import SCOPES, PruneState, masks, wrap

__all__ = [
    'DISTRIBUTIONS', 'FAN_IN', 'METHODS', 'REGROW', 'SCHEDULES', 'SCOPES', 'STRUCTURE_KINDS', 'TARGETS',
    'CondensedLinear', 'PruneState', 'compaction', 'condense', 'condensed',
    'condensed_matmul', 'default_prunable', 'experts', 'magnitude', 'oneshot',
    'post_training', 'sparsegpt', 'wanda', 'element_scores', 'erk_densities',
    'gmp_sparsity', 'group_scores', 'masks', 'n_m_mask', 'paths', 'plain_path',
    'prune_lowest', 'sparsity_mask', 'structured_masks', 'target_sparsity', 'update_steps',
    'wrap', 'zeros_per_layer',
]
