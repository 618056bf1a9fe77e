"""Configs at one boundary: defaults, config files, validate(), and resolve() to specs.

Config files live in configs/ (each has get_config()); they start from base_config() or
from a sibling file through load_config(). validate() checks every cross-field constraint
(config_rules.py) and raises ConfigError with one sentence per problem naming the key,
the value and what is valid. resolve() then turns the ConfigDict into frozen specs with
every default filled in (specs.py: ModelSpec, MoESpec, TrainSpec, PruningSpec, ...):
models, accounting, compaction, upcycling and the trainer take specs, never a ConfigDict.
Checkpoints keep the ConfigDict itself (as JSON); from_saved() reads it back, filling
keys added since.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import pathlib

import ml_collections

from sparse_jax import config_rules
# The value sets and parsers live with the rules; importing them from here keeps one
# boundary module.
from sparse_jax.config_rules import (  # noqa: F401
    ARCHITECTURES, DTYPES, REMAT, parse_layers, parse_n_m, pruning_end_step)
from sparse_jax.sharding import mesh_sizes
# The specs live in specs.py; importing them from here keeps one boundary module.
from sparse_jax.specs import ModelSpec, MoESpec, PruningSpec, Spec, TrainSpec  # noqa: F401



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
        end_step=pruning_end_step(config), update_every=p.update_every,
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
  problems = config_rules.problems(config, num_devices, num_processes)
  if problems:
    raise ConfigError('; '.join(problems) + '.')
