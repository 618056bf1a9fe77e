"""Tiny switch model for tests: 20 steps run in seconds on 2 CPU cores."""
import pathlib

from sparse_jax.config import load_config


def get_config():
  c = load_config(pathlib.Path(__file__).with_name('switch.py'))
  c.model.d_model = 32
  c.model.num_layers = 2
  c.model.num_heads = 2
  c.model.d_ff = 64
  c.moe.num_experts = 4
  c.train.steps = 20
  c.train.batch_size = 8
  c.train.seq_len = 32
  c.train.lr = 3e-3
  c.train.warmup_steps = 5
  c.train.log_every = 1
  c.train.eval_every = 10
  c.train.eval_batches = 2
  c.train.checkpoint_every = 10
  return c
