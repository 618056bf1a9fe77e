"""Training: the optimizer, the loss and steps (compiled by steps.build), orbax
checkpoints, and the loop behind `python -m sparse_jax.train`."""
