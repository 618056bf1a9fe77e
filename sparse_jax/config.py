"""Configs: defaults, loading config files, and validate() before any compile.

Config files live in configs/ (each has get_config()); they start from base_config() or
from a sibling file through load_config(). validate() checks every cross-field constraint
and raises ConfigError with one sentence naming the key, the value and what is valid.
"""
from __future__ import annotations

import importlib.util
import math
import pathlib

import ml_collections

from sparse_jax.dispatch import BACKENDS

def base_config() -> ml_collections.ConfigDict:
  """Defaults: a small byte-level decoder LM on the embedded corpus, dense FFNs."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.profile_steps = 0          # > 0: write a jax.profiler trace of this many steps

  c.data = ml_collections.ConfigDict()
  c.data.source = 'stdlib'     # 'stdlib' | 'tfds:NAME[:FEATURE]' | 'files:GLOB[,GLOB]'
  c.data.data_dir = ''         # '' -> $SPARSE_JAX_DATA or ~/.cache/sparse_jax

  c.model = ml_collections.ConfigDict()
  c.model.vocab_size = 256
  c.model.d_model = 256
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.head_dim = 0               # 0 -> d_model / num_heads (compaction may set it)
  c.model.d_ff = 1024
  c.model.activation = 'gelu'  # gelu | relu | swiglu
  c.model.tie_embeddings = True
  c.model.init_scale = 1.0
  c.model.param_dtype = 'float32'

  c.moe = ml_collections.ConfigDict()
  c.moe.num_experts = 0        # 0: every FFN dense
  c.moe.k = 1
  c.moe.capacity_factor = 1.25
  c.moe.dispatch = 'index'     # index | einsum | dropless
  c.moe.routing = 'top_k'      # top_k | expert_choice (needs allow_lookahead in an LM)
  c.moe.allow_lookahead = False
  c.moe.moe_every = 2          # block i is MoE if i >= moe_offset and
  c.moe.moe_offset = 1         #   (i - moe_offset) % moe_every == 0
  c.moe.d_ff = 0               # expert width; 0 -> model.d_ff
  c.moe.shared_d_ff = 0        # > 0: an always-on shared expert of this width
  c.moe.group_size = 0         # 0: all tokens of a device form one routing group
  c.moe.balancing = 'aux_loss'  # aux_loss | loss_free
  c.moe.bias_rate = 1e-3
  c.moe.router_jitter = 0.0
  c.moe.init_scale = 0.0       # 0 -> model.init_scale
  c.moe.load_balance_coef = 0.01
  c.moe.z_loss_coef = 1e-3
  # Renormalise the K combine weights; None -> k >= 2 (True turns k=1 weights into 1).
  c.moe.normalize_weights = ml_collections.config_dict.placeholder(bool)

  c.init = ml_collections.ConfigDict()
  # A dense run's workdir: start this (MoE) model from its latest checkpoint by sparse
  # upcycling (every expert a copy of the dense FFN; fresh router). Ignored on resume.
  c.init.upcycle_from = ''
  c.init.upcycle_noise = 0.0        # relative std of noise added to each expert copy
  c.init.router_init_scale = 0.01   # small router: near-uniform routing at the start

  c.pruning = ml_collections.ConfigDict()
  c.pruning.sparsity = 0.0          # > 0 turns the pruner on (sparse_jax.pruning.wrap)
  c.pruning.method = 'magnitude'    # magnitude | random | saliency
  c.pruning.schedule = 'gmp'        # gmp (cubic, Zhu & Gupta) | one_shot
  c.pruning.start_step = 0
  c.pruning.end_step = 0            # 0 -> 3/4 of train.steps
  c.pruning.update_every = 100
  c.pruning.distribution = 'uniform'  # uniform | erk
  c.pruning.scope = 'layer'         # layer | global
  c.pruning.n_m = ''                # 'N:M', e.g. '2:4'; '' for unstructured
  c.pruning.structure = ''          # '' | ffn_neurons | heads | experts
  c.pruning.targets = 'all'         # all | ffn | attn: which kernels the pruner may touch

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1             # -1: the devices left over
  c.mesh.expert = 1
  c.mesh.model = 1

  c.train = ml_collections.ConfigDict()
  c.train.steps = 2000
  c.train.batch_size = 32      # global, in sequences
  c.train.seq_len = 256
  c.train.lr = 1e-3
  c.train.warmup_steps = 100
  c.train.lr_decay_steps = 0   # cosine horizon; 0 -> train.steps
  c.train.min_lr_ratio = 0.1
  c.train.weight_decay = 0.1
  c.train.b1 = 0.9
  c.train.b2 = 0.95
  c.train.grad_clip = 1.0
  c.train.log_every = 10
  c.train.eval_every = 250
  c.train.eval_batches = 16
  c.train.checkpoint_every = 250
  c.train.keep_checkpoints = 3
  return c


def load_config(path: str | pathlib.Path) -> ml_collections.ConfigDict:
  """get_config() of a config file, e.g. a sibling: load_config(Path(__file__).with_name('switch.py'))."""
  path = pathlib.Path(path)
  spec = importlib.util.spec_from_file_location(f'sparse_jax_config_{path.stem}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def parse_n_m(text: str) -> tuple[int, int]:
  """'2:4' -> (2, 4)."""
  n, m = text.split(':')
  return int(n), int(m)


def pruning_end_step(config) -> int:
  """pruning.end_step, or 3/4 of training when it is 0 (leave time to recover)."""
  return config.pruning.end_step or max(config.pruning.start_step + 1,
                                        3 * config.train.steps // 4)


class ConfigError(ValueError):
  """A config value that cannot work; the message is one line."""


def _mesh_sizes(mesh_cfg, num_devices):
  sizes = {'data': mesh_cfg.data, 'expert': mesh_cfg.expert, 'model': mesh_cfg.model}
  free = [a for a, v in sizes.items() if v == -1]
  fixed = math.prod(v for v in sizes.values() if v != -1)
  if len(free) == 1 and fixed > 0 and num_devices % fixed == 0:
    sizes[free[0]] = num_devices // fixed
  return sizes


def validate(config: ml_collections.ConfigDict, num_devices: int,
             num_processes: int = 1) -> None:
  """Raise ConfigError naming every bad key, its value and what would be valid."""
  from sparse_jax.moe import ACTIVATIONS, BALANCING, ROUTINGS   # avoid an import cycle
  m, moe, t, mesh = config.model, config.moe, config.train, config.mesh
  problems = []

  def need(ok, msg):
    if not ok:
      problems.append(msg)

  for key in ('vocab_size', 'd_model', 'num_layers', 'num_heads', 'd_ff'):
    need(m[key] >= 1, f'model.{key}={m[key]} must be >= 1')
  if m.head_dim:
    need(m.head_dim % 2 == 0, f'model.head_dim={m.head_dim} must be even (RoPE)')
  elif m.num_heads >= 1:
    need(m.d_model % m.num_heads == 0 and (m.d_model // m.num_heads) % 2 == 0,
         f'model.d_model={m.d_model} must be model.num_heads={m.num_heads} times an even '
         'head dimension')
  need(m.activation in ACTIVATIONS,
       f'model.activation={m.activation!r} must be one of {sorted(ACTIVATIONS)}')
  need(m.param_dtype in ('float32', 'bfloat16'),
       f"model.param_dtype={m.param_dtype!r} must be 'float32' or 'bfloat16'")
  need(m.init_scale > 0, f'model.init_scale={m.init_scale} must be > 0')

  need(moe.num_experts >= 0, f'moe.num_experts={moe.num_experts} must be >= 0 (0 = dense)')
  if moe.num_experts > 0:
    need(1 <= moe.k <= moe.num_experts,
         f'moe.k={moe.k} must be between 1 and moe.num_experts={moe.num_experts}')
    need(moe.capacity_factor > 0, f'moe.capacity_factor={moe.capacity_factor} must be > 0')
    need(moe.dispatch in BACKENDS, f'moe.dispatch={moe.dispatch!r} must be one of {BACKENDS}')
    need(moe.routing in ROUTINGS, f'moe.routing={moe.routing!r} must be one of {ROUTINGS}')
    need(moe.routing != 'expert_choice' or moe.allow_lookahead,
         "moe.routing='expert_choice' sees future tokens in a causal LM; use 'top_k' or "
         'set moe.allow_lookahead=True')
    need(moe.balancing in BALANCING,
         f'moe.balancing={moe.balancing!r} must be one of {BALANCING}')
    need(moe.moe_every >= 1, f'moe.moe_every={moe.moe_every} must be >= 1')
    need(0 <= moe.moe_offset < m.num_layers,
         f'moe.moe_offset={moe.moe_offset} must be in [0, model.num_layers={m.num_layers}) '
         'or no block would be MoE')
    need(mesh.expert == -1 or mesh.expert < 1 or moe.num_experts % mesh.expert == 0,
         f'moe.num_experts={moe.num_experts} must be divisible by mesh.expert={mesh.expert}')
    need(moe.dispatch != 'dropless' or mesh.expert == 1,
         f"moe.dispatch='dropless' needs mesh.expert=1 (got {mesh.expert}): expert-"
         "parallel dropless needs ragged_all_to_all; use moe.dispatch='index'")
    for key in ('d_ff', 'shared_d_ff', 'group_size'):
      need(moe[key] >= 0, f'moe.{key}={moe[key]} must be >= 0 (0 = default)')

  sizes = {'data': mesh.data, 'expert': mesh.expert, 'model': mesh.model}
  free = [a for a, v in sizes.items() if v == -1]
  bad = [f'mesh.{a}={v}' for a, v in sizes.items() if v != -1 and v < 1]
  need(not bad and len(free) <= 1,
       f"mesh sizes must be >= 1 with at most one -1 (got {', '.join(bad) or sizes})")
  sizes = _mesh_sizes(mesh, num_devices)
  if not bad and len(free) <= 1:
    need(math.prod(sizes.values()) == num_devices,
         f'mesh data x expert x model = {sizes} must multiply to the {num_devices} devices '
         '(use -1 for one axis to take the rest)')

  for key in ('steps', 'batch_size', 'seq_len', 'log_every', 'eval_every',
              'eval_batches', 'checkpoint_every', 'keep_checkpoints'):
    need(t[key] >= 1, f'train.{key}={t[key]} must be >= 1')
  for key in ('warmup_steps', 'lr_decay_steps', 'weight_decay', 'grad_clip'):
    need(t[key] >= 0, f'train.{key}={t[key]} must be >= 0')
  need(t.lr > 0, f'train.lr={t.lr} must be > 0')
  need(0 <= t.min_lr_ratio <= 1, f'train.min_lr_ratio={t.min_lr_ratio} must be in [0, 1]')
  shards = sizes['data'] * sizes['expert']
  if t.batch_size >= 1 and shards >= 1:
    need(t.batch_size % shards == 0,
         f'train.batch_size={t.batch_size} must be divisible by mesh.data x mesh.expert '
         f'= {shards} (the token shards)')
    need(t.batch_size % num_processes == 0,
         f'train.batch_size={t.batch_size} must be divisible by the {num_processes} processes')
    per_device = t.batch_size // shards * t.seq_len
    if moe.num_experts > 0 and moe.group_size > 0 and per_device > 0:
      need(per_device % moe.group_size == 0,
           f'moe.group_size={moe.group_size} must divide the {per_device} tokens per device')
  pr = config.pruning
  need(0 <= pr.sparsity < 1, f'pruning.sparsity={pr.sparsity} must be in [0, 1) (0 = off)')
  if pr.sparsity > 0 or pr.n_m:
    need(pr.method in ('magnitude', 'random', 'saliency'),
         f"pruning.method={pr.method!r} must be 'magnitude', 'random' or 'saliency'")
    need(pr.schedule in ('gmp', 'one_shot'),
         f"pruning.schedule={pr.schedule!r} must be 'gmp' or 'one_shot'")
    need(pr.distribution in ('uniform', 'erk'),
         f"pruning.distribution={pr.distribution!r} must be 'uniform' or 'erk'")
    need(pr.scope in ('layer', 'global'), f"pruning.scope={pr.scope!r} must be 'layer' or 'global'")
    need(pr.structure in ('', 'ffn_neurons', 'heads', 'experts'),
         f"pruning.structure={pr.structure!r} must be '', 'ffn_neurons', 'heads' or 'experts'")
    need(pr.targets in ('all', 'ffn', 'attn'),
         f"pruning.targets={pr.targets!r} must be 'all', 'ffn' or 'attn'")
    need(pr.update_every >= 1, f'pruning.update_every={pr.update_every} must be >= 1')
    need(pr.start_step >= 0, f'pruning.start_step={pr.start_step} must be >= 0')
    end = pruning_end_step(config)
    need(pr.schedule != 'gmp' or end > pr.start_step,
         f'pruning.end_step={end} must be > pruning.start_step={pr.start_step} for gmp')
    if pr.n_m:
      try:
        n, m_ = parse_n_m(pr.n_m)
        need(0 < n < m_, f"pruning.n_m={pr.n_m!r} needs 0 < N < M")
      except ValueError:
        need(False, f"pruning.n_m={pr.n_m!r} must look like 'N:M', e.g. '2:4'")
  need(config.profile_steps >= 0, f'profile_steps={config.profile_steps} must be >= 0')
  need(any(config.data.source == p or config.data.source.startswith(p + ':')
           for p in ('stdlib', 'tfds', 'files')),
       f"data.source={config.data.source!r} must be 'stdlib', 'tfds:NAME' or 'files:GLOB'")
  if problems:
    raise ConfigError('; '.join(problems) + '.')
