"""The rules a config's values must keep: every cross-field constraint validate() checks,
each failure one sentence naming the key, the value and what is valid; and the value
sets and parsers they share with config.py (the boundary that raises ConfigError)."""
from __future__ import annotations

import math
import pathlib

import jax
import ml_collections

from sparse_jax import expert_parallel, pruning, roles, routing
from sparse_jax.dispatch import BACKENDS
from sparse_jax.grouped_matmul import GROUPED_MATMULS
from sparse_jax.layers import ACTIVATIONS, QK_NORMS
from sparse_jax.moe import BALANCING, EXPERT_COMPUTE, ROUTINGS
from sparse_jax.sharding import mesh_sizes

DTYPES = ('float32', 'bfloat16')
# The Hugging Face architectures sparse_jax.hub reads and writes (hub/families.py).
ARCHITECTURES = ('LlamaForCausalLM', 'MistralForCausalLM', 'MixtralForCausalLM',
                 'Qwen2MoeForCausalLM', 'Qwen3MoeForCausalLM', 'OlmoeForCausalLM',
                 'DeepseekV3ForCausalLM')
REMAT = ('none', 'block', 'dots')


def parse_layers(text: str) -> tuple[int, ...]:
  """'0,3' -> (0, 3); '' -> ()."""
  return tuple(sorted({int(t) for t in text.split(',') if t.strip()}))


def parse_n_m(text: str) -> tuple[int, int]:
  """'2:4' -> (2, 4)."""
  n, m = text.split(':')
  return int(n), int(m)


def pruning_end_step(config) -> int:
  """pruning.end_step, or 3/4 of training when it is 0 (leave time to recover)."""
  return config.pruning.end_step or max(config.pruning.start_step + 1,
                                        3 * config.train.steps // 4)


def problems(config: ml_collections.ConfigDict, num_devices: int,
             num_processes: int = 1) -> list[str]:
  """One sentence per broken rule of a config that has every key (config.validate)."""
  m, moe, t, mesh = config.model, config.moe, config.train, config.mesh
  problems = []

  def need(ok, msg):
    if not ok:
      problems.append(msg)

  def choice(key, value, allowed):
    need(value in allowed, f'{key}={value!r} must be one of {tuple(allowed)}')

  for key in ('vocab_size', 'd_model', 'num_layers', 'num_heads', 'd_ff'):
    need(m[key] >= 1, f'model.{key}={m[key]} must be >= 1')
  if m.head_dim:
    need(m.head_dim % 2 == 0, f'model.head_dim={m.head_dim} must be even (RoPE)')
  elif m.num_heads >= 1:
    need(m.d_model % m.num_heads == 0 and (m.d_model // m.num_heads) % 2 == 0,
         f'model.d_model={m.d_model} must be model.num_heads={m.num_heads} times an even '
         'head dimension')
  choice('model.activation', m.activation, ACTIVATIONS)
  choice('model.param_dtype', m.param_dtype, DTYPES)
  choice('model.dtype', m.dtype, DTYPES)
  need(m.init_scale > 0, f'model.init_scale={m.init_scale} must be > 0')
  need(m.num_kv_heads >= 0 and (m.num_kv_heads == 0 or m.num_heads % m.num_kv_heads == 0),
       f'model.num_kv_heads={m.num_kv_heads} must divide model.num_heads={m.num_heads} '
       '(0 = one key/value head per query head)')
  choice('model.qk_norm', m.qk_norm, QK_NORMS)
  need(m.rope_theta > 0, f'model.rope_theta={m.rope_theta} must be > 0')
  need(m.qkv_clip >= 0, f'model.qkv_clip={m.qkv_clip} must be >= 0 (0 = no clamp)')
  if m.kv_lora_rank:
    need(m.qk_rope_head_dim > 0 and m.qk_rope_head_dim % 2 == 0 and m.v_head_dim > 0
         and m.qk_nope_head_dim >= 0 and m.q_lora_rank >= 0,
         f'model.kv_lora_rank={m.kv_lora_rank} (latent attention) needs an even '
         f'model.qk_rope_head_dim > 0 (got {m.qk_rope_head_dim}) and model.v_head_dim > 0 '
         f'(got {m.v_head_dim})')
    need(m.qk_norm == 'none' and not m.qkv_bias and not m.qkv_clip and not m.num_kv_heads,
         'latent attention (model.kv_lora_rank > 0) takes no model.qk_norm, qkv_bias, '
         'qkv_clip or num_kv_heads')
  need(m.norm_eps > 0, f'model.norm_eps={m.norm_eps} must be > 0')
  choice('model.architecture', m.architecture, ('',) + ARCHITECTURES)
  tok = config.data.tokenizer
  need(tok == 'bytes' or pathlib.Path(tok).is_file(),
       f"data.tokenizer={tok!r} is neither 'bytes' nor a tokenizer.json file")
  need(0 <= config.data.eod_id < m.vocab_size,
       f'data.eod_id={config.data.eod_id} must be a token id below model.vocab_size='
       f'{m.vocab_size}')

  need(moe.num_experts >= 0, f'moe.num_experts={moe.num_experts} must be >= 0 (0 = dense)')
  if moe.num_experts > 0:
    need(1 <= moe.k <= moe.num_experts,
         f'moe.k={moe.k} must be between 1 and moe.num_experts={moe.num_experts}')
    need(0 < moe.capacity_factor < math.inf,
         f'moe.capacity_factor={moe.capacity_factor} must be finite and > 0 (for no '
         "dropping use moe.dispatch='dropless')")
    choice('moe.dispatch', moe.dispatch, BACKENDS)
    choice('moe.routing', moe.routing, ROUTINGS)
    choice('moe.balancing', moe.balancing, BALANCING)
    choice('moe.expert_compute', moe.expert_compute, ('auto',) + EXPERT_COMPUTE)
    choice('moe.grouped_matmul', moe.grouped_matmul, ('auto',) + GROUPED_MATMULS)
    need(isinstance(moe.block_size, int) and moe.block_size >= 1,
         f'moe.block_size={moe.block_size!r} must be a positive integer')
    try:
      expert_parallel.check_transport(moe.ep_transport, jax.default_backend())
    except ValueError as e:
      problems.append(f'moe.{str(e).rstrip(".")}')
    need(moe.dispatch != 'dropless' or moe.routing == 'top_k',
         f"moe.dispatch='dropless' serves moe.routing='top_k' only (got "
         f"{moe.routing!r}): expert choice has a fixed capacity by construction; use "
         "moe.dispatch='index'")
    if moe.routing == 'expert_choice':
      try:
        routing.check_expert_choice(causal=True, allow_lookahead=moe.allow_lookahead)
      except ValueError as e:
        problems.append(f"moe.routing='expert_choice': {str(e).rstrip('.')} (config key "
                        'moe.allow_lookahead)')
    need(moe.moe_every >= 1, f'moe.moe_every={moe.moe_every} must be >= 1')
    try:
      dense = parse_layers(moe.dense_layers)
      need(all(0 <= i < m.num_layers for i in dense),
           f'moe.dense_layers={moe.dense_layers!r} names a block outside [0, '
           f'model.num_layers={m.num_layers})')
    except (ValueError, AttributeError):
      need(False, f"moe.dense_layers={moe.dense_layers!r} must be block indices separated "
                  "by commas, e.g. '0,3' ('' = none)")
    try:
      routing.check_groups(moe.num_experts, moe.k, moe.router_score, moe.n_group,
                           moe.topk_group)
    except ValueError as e:
      problems.append(f'{str(e).rstrip(".")} (keys moe.router_score, moe.n_group, '
                      'moe.topk_group)')
    need(moe.routed_scale > 0, f'moe.routed_scale={moe.routed_scale} must be > 0')
    need(not moe.shared_gate or moe.shared_d_ff > 0,
         'moe.shared_gate=True gates the shared expert: it needs moe.shared_d_ff > 0')
    need(0 <= moe.moe_offset < m.num_layers,
         f'moe.moe_offset={moe.moe_offset} must be in [0, model.num_layers={m.num_layers}) '
         'or no block would be MoE')
    need(mesh.expert == -1 or mesh.expert < 1 or moe.num_experts % mesh.expert == 0,
         f'moe.num_experts={moe.num_experts} must be divisible by mesh.expert={mesh.expert}')
    for key in ('d_ff', 'shared_d_ff', 'group_size'):
      need(moe[key] >= 0, f'moe.{key}={moe[key]} must be >= 0 (0 = default)')
    for key in ('init_scale', 'router_init_scale'):
      need(moe[key] >= 0, f'moe.{key}={moe[key]} must be >= 0 (0 = default)')

  sizes = None
  try:
    sizes = mesh_sizes(mesh.data, mesh.expert, mesh.model, num_devices=num_devices)
  except ValueError as e:
    need(False, f'mesh.data/expert/model: {e}')

  if sizes is not None and sizes['model'] > 1:   # it splits heads and FFN hidden units
    widths = {'model.num_heads': m.num_heads, 'model.d_ff': m.d_ff,
              'model.num_kv_heads': m.num_kv_heads or m.num_heads}
    if moe.num_experts > 0 and moe.shared_d_ff > 0:
      widths['moe.shared_d_ff'] = moe.shared_d_ff
    for key, n in widths.items():
      need(n % sizes['model'] == 0,
           f'{key}={n} must be divisible by mesh.model={sizes["model"]} (tensor parallelism '
           'splits it)')
  for key in ('steps', 'batch_size', 'seq_len', 'log_every', 'eval_every',
              'eval_batches', 'checkpoint_every', 'keep_checkpoints'):
    need(t[key] >= 1, f'train.{key}={t[key]} must be >= 1')
  for key in ('warmup_steps', 'lr_decay_steps', 'weight_decay', 'grad_clip'):
    need(t[key] >= 0, f'train.{key}={t[key]} must be >= 0')
  need(t.lr > 0, f'train.lr={t.lr} must be > 0')
  choice('train.remat', t.remat, REMAT)
  need(isinstance(m.scan_layers, bool),
       f'model.scan_layers={m.scan_layers!r} must be True or False')
  need(t.microbatches >= 1, f'train.microbatches={t.microbatches} must be >= 1')
  need(isinstance(mesh.fsdp, bool), f'mesh.fsdp={mesh.fsdp!r} must be True or False')
  need(0 <= t.min_lr_ratio <= 1, f'train.min_lr_ratio={t.min_lr_ratio} must be in [0, 1]')
  if sizes is not None and t.batch_size >= 1:
    shards = sizes['data'] * sizes['expert']
    need(t.batch_size % shards == 0,
         f'train.batch_size={t.batch_size} must be divisible by mesh.data x mesh.expert '
         f'= {shards} (the token shards)')
    need(t.batch_size % num_processes == 0,
         f'train.batch_size={t.batch_size} must be divisible by the {num_processes} processes')
    rows = t.batch_size // shards
    micro = max(t.microbatches, 1)
    need(rows % micro == 0,
         f'train.microbatches={t.microbatches} must divide the {rows} sequences per device '
         f'(train.batch_size={t.batch_size} over {shards} token shards)')
    per_device = rows // micro * t.seq_len
    if moe.num_experts > 0 and moe.group_size > 0 and per_device > 0:
      need(per_device % moe.group_size == 0,
           f'moe.group_size={moe.group_size} must divide the {per_device} tokens per device'
           + (' and micro-batch' if micro > 1 else ''))
  pr = config.pruning
  need(0 <= pr.sparsity < 1, f'pruning.sparsity={pr.sparsity} must be in [0, 1) (0 = off)')
  if pr.sparsity > 0 or pr.n_m:
    choice('pruning.method', pr.method, pruning.METHODS)
    choice('pruning.schedule', pr.schedule, pruning.SCHEDULES)
    choice('pruning.distribution', pr.distribution, pruning.DISTRIBUTIONS)
    choice('pruning.scope', pr.scope, pruning.SCOPES)
    choice('pruning.structure', pr.structure, ('',) + pruning.STRUCTURE_KINDS)
    need(pr.structure != 'heads' or (m.num_kv_heads in (0, m.num_heads) and not
                                     m.kv_lora_rank and m.qk_norm != 'proj' and
                                     not m.qkv_bias),
         "pruning.structure='heads' removes whole q/k/v heads: it needs one key/value head "
         "per query head, no latent attention, no model.qkv_bias and model.qk_norm other "
         "than 'proj' (got "
         f'num_kv_heads={m.num_kv_heads}, qkv_bias={m.qkv_bias}, qk_norm={m.qk_norm!r})')
    need(not (pr.structure and m.scan_layers),
         f'pruning.structure={pr.structure!r} finds its groups in unrolled blocks: set '
         'model.scan_layers=False for this run (a checkpoint resumes in either layout)')
    choice('pruning.targets', pr.targets, roles.TARGETS)
    need(pr.update_every >= 1, f'pruning.update_every={pr.update_every} must be >= 1')
    need(pr.start_step >= 0, f'pruning.start_step={pr.start_step} must be >= 0')
    end = pruning_end_step(config)
    need(pr.schedule not in ('gmp', 'dynamic') or end > pr.start_step,
         f'pruning.end_step={end} must be > pruning.start_step={pr.start_step} for '
         f'{pr.schedule}')
    if pr.schedule == 'dynamic':
      choice('pruning.regrow', pr.regrow, pruning.REGROW)
      choice('pruning.fan_in', pr.fan_in, pruning.FAN_IN)
      need(0 <= pr.drop_fraction <= 1,
           f'pruning.drop_fraction={pr.drop_fraction} must be in [0, 1] (0 = static sparse)')
      need(0 <= pr.min_salient <= 1 and (not pr.min_salient or (pr.fan_in, pr.regrow) == (
          'constant', 'gradient')),
           f'pruning.min_salient={pr.min_salient} must be in [0, 1], and above 0 only with '
           "pruning.fan_in='constant' and pruning.regrow='gradient' (SRigL's neuron "
           f'ablation; got fan_in={pr.fan_in!r}, regrow={pr.regrow!r})')
      need(pr.scope == 'layer' and not pr.n_m and not pr.structure,
           "pruning.schedule='dynamic' moves single weights within each layer: it needs "
           f"pruning.scope='layer' and no pruning.n_m or pruning.structure (got "
           f'scope={pr.scope!r}, n_m={pr.n_m!r}, structure={pr.structure!r})')
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
  return problems
