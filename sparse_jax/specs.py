"""The resolved, frozen specs of a run: what models, accounting, compaction, upcycling and
the trainer take (never a ConfigDict). sparse_jax.config.resolve() builds them from a
validated config, every default filled in."""
from __future__ import annotations

import dataclasses

# The version of ModelSpec.to_json's format. Fields added later carry defaults, so an older
# record still loads; a record from a newer version is refused by name.
SPEC_VERSION = 1


class SpecError(ValueError):
  """A stored model spec that this version cannot read; one line."""


@dataclasses.dataclass(frozen=True)
class MoESpec:
  """The MoE blocks of a model, every default resolved."""
  num_experts: int
  k: int
  capacity_factor: float
  dispatch: str
  routing: str
  allow_lookahead: bool
  moe_every: int
  moe_offset: int
  d_ff: int
  shared_d_ff: int                 # 0: no shared expert
  group_size: int | None           # None: the tokens one device holds
  balancing: str
  bias_rate: float
  router_jitter: float
  init_scale: float
  router_init_scale: float
  normalize_weights: bool
  expert_compute: str | None       # None: moe.default_expert_compute() where it runs
  grouped_matmul: str | None       # None: grouped_matmul.default_grouped_matmul()
  block_size: int
  ep_transport: str
  load_balance_coef: float
  z_loss_coef: float
  dense_layers: tuple[int, ...] = ()  # blocks that stay dense whatever moe_every says
  shared_gate: bool = False        # the shared expert scaled by sigmoid(x @ w) (Qwen2-MoE)
  router_score: str = 'softmax'    # router probabilities: softmax | sigmoid (DeepSeek-V3)
  n_group: int = 1                 # group-limited top-k: experts in n_group groups, of
  topk_group: int = 1              #   which each token's topk_group best are eligible
  routed_scale: float = 1.0        # factor on the routed weights (routed_scaling_factor)

  def layer_kwargs(self) -> dict:
    """Keyword arguments of sparse_jax.moe.MoE beyond d_model, d_ff and num_experts."""
    return dict(k=self.k, capacity_factor=self.capacity_factor, dispatch=self.dispatch,
                routing=self.routing, allow_lookahead=self.allow_lookahead,
                normalize_weights=self.normalize_weights, group_size=self.group_size,
                balancing=self.balancing, bias_rate=self.bias_rate,
                router_jitter=self.router_jitter, init_scale=self.init_scale,
                router_init_scale=self.router_init_scale,
                shared_d_ff=self.shared_d_ff or None, expert_compute=self.expert_compute,
                grouped_matmul=self.grouped_matmul, block_size=self.block_size,
                ep_transport=self.ep_transport, shared_gate=self.shared_gate,
                router_score=self.router_score, n_group=self.n_group,
                topk_group=self.topk_group, routed_scale=self.routed_scale)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """The decoder LM, every default resolved; moe is None for an all-dense model."""
  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  head_dim: int
  d_ff: int
  activation: str
  tie_embeddings: bool
  init_scale: float
  param_dtype: str
  dtype: str                       # compute dtype of activations and matmuls
  moe: MoESpec | None
  num_kv_heads: int = 0            # key/value heads (grouped-query attention); 0: num_heads
  qk_norm: str = 'none'            # RMSNorm of q and k: 'none' | 'head' (over each head's
                                   #   Dh, Qwen3) | 'proj' (over the whole projection, OLMoE)
  qkv_bias: bool = False           # biases on the q, k, v projections (Qwen2)
  qkv_clip: float = 0.0            # > 0: clamp q, k, v to [-qkv_clip, qkv_clip] (OLMoE)
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-6           # every RMSNorm's epsilon
  architecture: str = ''           # the Hugging Face architecture it exports as; '' native
  # Multi-head latent attention (sparse_jax.mla) when kv_lora_rank > 0 (DeepSeek).
  q_lora_rank: int = 0             # 0: q straight from x
  kv_lora_rank: int = 0
  qk_nope_head_dim: int = 0
  qk_rope_head_dim: int = 0
  v_head_dim: int = 0
  rope_interleave: bool = False    # RoPE pairs channels (2i, 2i+1) (DeepSeek) not (i, i+Dh/2)
  # The repeating pattern of blocks stacked [G, ...] and run under one scan (models.layout);
  # the same function either way, so a checkpoint converts between the layouts.
  scan_layers: bool = False

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  def to_json(self) -> dict:
    """The spec as JSON (what a checkpoint stores beside its state), with SPEC_VERSION."""
    return {'version': SPEC_VERSION, **dataclasses.asdict(self)}

  @classmethod
  def from_json(cls, record: dict) -> ModelSpec:
    """Inverse of to_json. SpecError for a newer version or a field this code lacks."""
    record = dict(record)
    version = record.pop('version', None)
    if not isinstance(version, int) or version > SPEC_VERSION:
      raise SpecError(f'the stored model spec has version {version!r}; this sparse_jax '
                      f'reads versions up to {SPEC_VERSION}: upgrade sparse_jax to load it')
    moe = record.pop('moe', None)
    if moe is not None:
      moe = _from_fields(MoESpec, moe)
    return _from_fields(cls, {**record, 'moe': moe})

  def is_moe_block(self, i: int) -> bool:
    """Block i is MoE when i >= moe_offset, (i - moe_offset) % moe_every == 0 and i is not
    one of moe.dense_layers."""
    m = self.moe
    return (m is not None and i >= m.moe_offset and (i - m.moe_offset) % m.moe_every == 0
            and i not in m.dense_layers)


def _from_fields(cls, record: dict):
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(record) - names)
  if unknown:
    raise SpecError(f'the stored model spec has fields {unknown} that {cls.__name__} lacks: '
                    'it was written by another sparse_jax version; load it with that one')
  return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in record.items()})


@dataclasses.dataclass(frozen=True)
class TrainSpec:
  steps: int
  batch_size: int
  seq_len: int
  microbatches: int
  remat: str
  lr: float
  warmup_steps: int
  lr_decay_steps: int
  min_lr_ratio: float
  weight_decay: float
  b1: float
  b2: float
  grad_clip: float
  log_every: int
  eval_every: int
  eval_batches: int
  checkpoint_every: int
  keep_checkpoints: int


@dataclasses.dataclass(frozen=True)
class PruningSpec:
  """The keyword arguments of sparse_jax.pruning.wrap (see wrap_kwargs); which leaves it
  prunes comes from the model's roles (sparse_jax.roles.prunable(roles, targets))."""
  sparsity: float
  method: str
  schedule: str
  start_step: int
  end_step: int
  update_every: int
  distribution: str
  scope: str
  n_m: tuple[int, int] | None
  structure: str | None
  targets: str
  regrow: str = 'gradient'
  fan_in: str = 'any'
  drop_fraction: float = 0.3
  min_salient: float = 0.0
  seed: int = 0

  def wrap_kwargs(self, num_heads: int) -> dict:
    extra = dict(structure=self.structure, num_heads=num_heads) if self.structure else {}
    return dict(sparsity=self.sparsity, method=self.method, schedule=self.schedule,
                start_step=self.start_step, end_step=self.end_step,
                update_every=self.update_every, distribution=self.distribution,
                scope=self.scope, n_m=self.n_m, seed=self.seed, regrow=self.regrow,
                fan_in=self.fan_in, drop_fraction=self.drop_fraction,
                min_salient=self.min_salient, **extra)


@dataclasses.dataclass(frozen=True)
class Spec:
  """A whole run: what sparse_jax.training takes."""
  seed: int
  profile_steps: int
  data_source: str
  data_dir: str | None
  model: ModelSpec
  mesh: dict                       # {'data', 'expert', 'model'}: sizes, no -1
  fsdp: bool                       # parameters and optimizer state also over 'data'
  train: TrainSpec
  pruning: PruningSpec | None      # None: no pruner
  upcycle_from: str | None
  upcycle_noise: float
  upcycle_router_init_scale: float
  data_tokenizer: str | None = None  # a tokenizer.json; None: bytes
  eod_id: int = 0                    # the token that ends each document
