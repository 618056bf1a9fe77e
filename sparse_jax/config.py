"""Configs at one boundary: defaults, config files, validate(), and resolve() to specs.

Config files live in configs/ (each has get_config()); they start from base_config() or
from a sibling file through load_config(). validate() checks every cross-field constraint
and raises ConfigError with one sentence per problem naming the key, the value and what
is valid. resolve() then turns the ConfigDict into frozen specs with every default
filled in (specs.py: ModelSpec, MoESpec, TrainSpec, PruningSpec, ...): models, accounting,
compaction, upcycling and the trainer take specs, never a ConfigDict. Checkpoints keep
the ConfigDict itself (as JSON); from_saved() reads it back, filling keys added since.
"""
from __future__ import annotations

import dataclasses
import importlib.util
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
# The specs live in specs.py; importing them from here keeps one boundary module.
from sparse_jax.specs import ModelSpec, MoESpec, PruningSpec, Spec, TrainSpec  # noqa: F401

DTYPES = ('float32', 'bfloat16')
# The Hugging Face architectures sparse_jax.hub reads and writes (hub/families.py).
ARCHITECTURES = ('LlamaForCausalLM', 'MistralForCausalLM', 'MixtralForCausalLM',
                 'Qwen2MoeForCausalLM', 'Qwen3MoeForCausalLM', 'OlmoeForCausalLM',
                 'DeepseekV3ForCausalLM')
REMAT = ('none', 'block', 'dots')


def base_config() -> ml_collections.ConfigDict:
  """Defaults: a small byte-level decoder LM on the embedded corpus, dense FFNs."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.profile_steps = 0          # > 0: write a jax.profiler trace of this many steps

  c.data = ml_collections.ConfigDict()
  c.data.source = 'stdlib'     # 'stdlib' | 'tfds:NAME[:FEATURE]' | 'files:GLOB[,GLOB]'
  c.data.data_dir = ''         # '' -> $SPARSE_JAX_DATA or ~/.cache/sparse_jax
  c.data.tokenizer = 'bytes'   # bytes | the path of a tokenizer.json (an imported model's)
  c.data.eod_id = 0            # the token appended to each document

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
  c.model.param_dtype = 'float32'   # parameters and optimizer state
  c.model.dtype = 'float32'         # compute: activations and matmuls (float32 | bfloat16)
  c.model.num_kv_heads = 0          # key/value heads (grouped-query attention); 0: num_heads
  c.model.qk_norm = 'none'          # none | head (RMSNorm per head, Qwen3) | proj (OLMoE)
  c.model.qkv_bias = False          # biases on the q, k, v projections (Qwen2)
  c.model.qkv_clip = 0.0            # > 0: clamp q, k, v to [-qkv_clip, qkv_clip] (OLMoE)
  c.model.rope_theta = 10000.0
  c.model.norm_eps = 1e-6           # every RMSNorm's epsilon
  c.model.architecture = ''         # Hugging Face architecture it exports as; '' native
  c.model.kv_lora_rank = 0          # > 0: multi-head latent attention (DeepSeek), with
  c.model.q_lora_rank = 0           #   these ranks (q: 0 = no q latent) and head dims
  c.model.qk_nope_head_dim = 0
  c.model.qk_rope_head_dim = 0
  c.model.v_head_dim = 0
  c.model.rope_interleave = False   # RoPE pairs channels (2i, 2i+1) (DeepSeek)
  c.model.scan_layers = False       # stack the repeating blocks and scan them (compiles once)

  c.moe = ml_collections.ConfigDict()
  c.moe.num_experts = 0        # 0: every FFN dense
  c.moe.k = 1
  c.moe.capacity_factor = 1.25
  c.moe.dispatch = 'index'     # index | einsum | dropless
  c.moe.routing = 'top_k'      # top_k | expert_choice (needs allow_lookahead in an LM)
  c.moe.allow_lookahead = False
  c.moe.moe_every = 2          # block i is MoE if i >= moe_offset and
  c.moe.moe_offset = 1         #   (i - moe_offset) % moe_every == 0
  c.moe.dense_layers = ''      # blocks kept dense whatever moe_every says, e.g. '0,3'
  c.moe.d_ff = 0               # expert width; 0 -> model.d_ff
  c.moe.shared_d_ff = 0        # > 0: an always-on shared expert of this width
  c.moe.shared_gate = False    # scale the shared expert by sigmoid(x @ w) (Qwen2-MoE)
  c.moe.router_score = 'softmax'  # softmax | sigmoid (DeepSeek-V3)
  c.moe.n_group = 1            # group-limited top-k: the experts in n_group groups, of
  c.moe.topk_group = 1         #   which each token may use its topk_group best
  c.moe.routed_scale = 1.0     # factor on the routed combine weights
  c.moe.group_size = 0         # 0: all tokens of a device form one routing group
  c.moe.balancing = 'aux_loss'  # aux_loss | loss_free
  c.moe.bias_rate = 1e-3
  c.moe.router_jitter = 0.0
  c.moe.init_scale = 0.0       # 0 -> model.init_scale (experts and shared expert)
  c.moe.router_init_scale = 0.0  # 0 -> the experts' init scale
  c.moe.expert_compute = 'auto'  # auto (loop on CPU, batched elsewhere) | loop | batched
  c.moe.grouped_matmul = 'auto'  # dropless: auto (blocked on CPU, ragged_dot elsewhere)
  c.moe.block_size = 64          #   | blocked | ragged_dot; rows per blocked window
  c.moe.ep_transport = 'all_to_all'  # dropless over mesh.expert > 1: all_to_all | sized |
                                     #   all_gather | ragged (not on CPU) | ragged_reference
  c.moe.load_balance_coef = 0.01
  c.moe.z_loss_coef = 1e-3
  # Renormalise the K combine weights; None -> k >= 2 (True turns k=1 weights into 1).
  c.moe.normalize_weights = ml_collections.config_dict.placeholder(bool)

  c.init = ml_collections.ConfigDict()
  # A dense run's workdir: start this (MoE) model from its latest checkpoint by sparse
  # upcycling (every expert a copy of the dense FFN; fresh router). Ignored on resume.
  c.init.upcycle_from = ''
  c.init.upcycle_noise = 0.0        # relative std of noise added to each expert copy
  c.init.router_init_scale = 0.01   # the upcycled routers' init scale: near-uniform start

  c.pruning = ml_collections.ConfigDict()
  c.pruning.sparsity = 0.0          # > 0 turns the pruner on (sparse_jax.pruning.wrap)
  c.pruning.method = 'magnitude'    # pruning.METHODS
  c.pruning.schedule = 'gmp'        # pruning.SCHEDULES: gmp (cubic, Zhu & Gupta), one_shot,
                                    #   dynamic (sparse from start_step; SET / RigL / SRigL)
  c.pruning.start_step = 0
  c.pruning.end_step = 0            # 0 -> 3/4 of train.steps
  c.pruning.update_every = 100
  c.pruning.distribution = 'uniform'  # uniform | erk
  c.pruning.scope = 'layer'         # layer | global
  c.pruning.n_m = ''                # 'N:M', e.g. '2:4'; '' for unstructured
  c.pruning.structure = ''          # '' | ffn_neurons | heads | experts
  c.pruning.targets = 'all'         # all | ffn | attn: which kernels the pruner may touch
  c.pruning.regrow = 'gradient'     # dynamic: gradient (RigL) | random (SET)
  c.pruning.fan_in = 'any'          # dynamic: any | constant (SRigL: same inputs per neuron)
  c.pruning.drop_fraction = 0.3     # dynamic: alpha, cosine-decayed to 0 at end_step
  c.pruning.min_salient = 0.0       # dynamic, constant fan-in: SRigL's neuron ablation (0: off)

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1             # -1: the devices left over
  c.mesh.expert = 1
  c.mesh.model = 1
  c.mesh.fsdp = False          # also split parameters and optimizer state over 'data'

  c.train = ml_collections.ConfigDict()
  c.train.steps = 2000
  c.train.batch_size = 32      # global, in sequences
  c.train.seq_len = 256
  c.train.microbatches = 1     # gradient accumulation: micro-batches per optimizer step
  c.train.remat = 'none'       # none | block (recompute each block) | dots (keep its matmuls)
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


def from_saved(saved: dict) -> ml_collections.ConfigDict:
  """A ConfigDict from a checkpoint's saved JSON, on top of today's defaults (so a
  checkpoint written before a key existed reads with that key's default)."""
  c = base_config()

  def merge(dst, src, prefix):
    for key, value in src.items():
      if key not in dst:
        raise ConfigError(f'saved config key {prefix + key!r} is unknown to this version')
      if isinstance(dst[key], ml_collections.ConfigDict):
        merge(dst[key], value, prefix + key + '.')
      else:
        dst[key] = value

  merge(c, saved, '')
  return c


def parse_layers(text: str) -> tuple[int, ...]:
  """'0,3' -> (0, 3); '' -> ()."""
  return tuple(sorted({int(t) for t in text.split(',') if t.strip()}))


def parse_n_m(text: str) -> tuple[int, int]:
  """'2:4' -> (2, 4)."""
  n, m = text.split(':')
  return int(n), int(m)


class ConfigError(ValueError):
  """A config value that cannot work; the message is one line."""


def model_spec(config: ml_collections.ConfigDict) -> ModelSpec:
  """The ModelSpec of config.model and config.moe (no validation; resolve() validates)."""
  m, moe = config.model, config.moe
  moe_spec = None
  if moe.num_experts > 0:
    init = moe.init_scale or m.init_scale
    moe_spec = MoESpec(
        num_experts=moe.num_experts, k=moe.k, capacity_factor=moe.capacity_factor,
        dispatch=moe.dispatch, routing=moe.routing, allow_lookahead=moe.allow_lookahead,
        moe_every=moe.moe_every, moe_offset=moe.moe_offset, d_ff=moe.d_ff or m.d_ff,
        shared_d_ff=moe.shared_d_ff, group_size=moe.group_size or None,
        balancing=moe.balancing, bias_rate=moe.bias_rate, router_jitter=moe.router_jitter,
        init_scale=init, router_init_scale=moe.router_init_scale or init,
        normalize_weights=(moe.k >= 2 if moe.normalize_weights is None
                           else moe.normalize_weights),
        expert_compute=None if moe.expert_compute == 'auto' else moe.expert_compute,
        grouped_matmul=None if moe.grouped_matmul == 'auto' else moe.grouped_matmul,
        block_size=moe.block_size, ep_transport=moe.ep_transport,
        load_balance_coef=moe.load_balance_coef, z_loss_coef=moe.z_loss_coef,
        dense_layers=parse_layers(moe.dense_layers), shared_gate=moe.shared_gate,
        router_score=moe.router_score, n_group=moe.n_group, topk_group=moe.topk_group,
        routed_scale=float(moe.routed_scale))
  return ModelSpec(
      vocab_size=m.vocab_size, d_model=m.d_model, num_layers=m.num_layers,
      num_heads=m.num_heads, head_dim=m.head_dim or m.d_model // m.num_heads, d_ff=m.d_ff,
      activation=m.activation, tie_embeddings=m.tie_embeddings, init_scale=m.init_scale,
      param_dtype=m.param_dtype, dtype=m.dtype, moe=moe_spec, num_kv_heads=m.num_kv_heads,
      qk_norm=m.qk_norm, qkv_bias=m.qkv_bias, qkv_clip=float(m.qkv_clip), rope_theta=float(m.rope_theta),
      norm_eps=float(m.norm_eps), architecture=m.architecture, q_lora_rank=m.q_lora_rank,
      kv_lora_rank=m.kv_lora_rank, qk_nope_head_dim=m.qk_nope_head_dim,
      qk_rope_head_dim=m.qk_rope_head_dim, v_head_dim=m.v_head_dim,
      rope_interleave=m.rope_interleave, scan_layers=m.scan_layers)


def resolve(config: ml_collections.ConfigDict, num_devices: int,
            num_processes: int = 1) -> Spec:
  """validate(config), then the frozen Spec with every default resolved."""
  validate(config, num_devices, num_processes)
  t, p = config.train, config.pruning
  prune = None
  if p.sparsity > 0 or p.n_m:
    prune = PruningSpec(
        sparsity=p.sparsity, method=p.method, schedule=p.schedule, start_step=p.start_step,
        end_step=_pruning_end_step(config), update_every=p.update_every,
        distribution=p.distribution, scope=p.scope,
        n_m=parse_n_m(p.n_m) if p.n_m else None, structure=p.structure or None,
        targets=p.targets, regrow=p.regrow, fan_in=p.fan_in, drop_fraction=p.drop_fraction,
        min_salient=p.min_salient, seed=config.seed)
  train = TrainSpec(**{f.name: t[f.name] for f in dataclasses.fields(TrainSpec)
                       if f.name != 'lr_decay_steps'},
                    lr_decay_steps=t.lr_decay_steps or t.steps)
  return Spec(
      seed=config.seed, profile_steps=config.profile_steps,
      data_source=config.data.source, data_dir=config.data.data_dir or None,
      model=model_spec(config), train=train, pruning=prune,
      mesh=mesh_sizes(config.mesh.data, config.mesh.expert, config.mesh.model,
                      num_devices=num_devices),
      fsdp=config.mesh.fsdp,
      upcycle_from=config.init.upcycle_from or None,
      upcycle_noise=config.init.upcycle_noise,
      upcycle_router_init_scale=config.init.router_init_scale,
      data_tokenizer=None if config.data.tokenizer == 'bytes' else config.data.tokenizer,
      eod_id=config.data.eod_id)


def _pruning_end_step(config) -> int:
  """pruning.end_step, or 3/4 of training when it is 0 (leave time to recover)."""
  return config.pruning.end_step or max(config.pruning.start_step + 1,
                                        3 * config.train.steps // 4)


# ------------------------------------------------------------------------- validate

def _missing_keys(want: ml_collections.ConfigDict, have, prefix: str = '') -> list[str]:
  """Dotted keys of `want` that `have` lacks."""
  out = []
  for key, value in want.items():
    if key not in have:
      out.append(prefix + key)
    elif isinstance(value, ml_collections.ConfigDict):
      out += _missing_keys(value, have[key], f'{prefix}{key}.')
  return out


def validate(config: ml_collections.ConfigDict, num_devices: int,
             num_processes: int = 1) -> None:
  """Raise ConfigError naming every bad key, its value and what would be valid."""
  missing = _missing_keys(base_config(), config)
  if missing:
    raise ConfigError(f'the config lacks {", ".join(missing[:8])}'
                      f'{" and more" if len(missing) > 8 else ""}; start get_config() from '
                      'sparse_jax.config.base_config() or load_config() of a file in configs/')
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
    end = _pruning_end_step(config)
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
  if problems:
    raise ConfigError('; '.join(problems) + '.')
