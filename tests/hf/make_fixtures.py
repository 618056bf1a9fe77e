"""Build tiny random-weight Hugging Face reference models and their outputs.

What it does
------------
For each model family the JAX implementation is tested against (Llama, Mistral,
Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3) this script builds a tiny
float32 ``transformers`` model from a config written in code (nothing comes from
the Hub), re-initialises every learnable tensor with a fixed seed (transformers'
default init -- std 0.02, norms at 1, biases and the DeepSeek correction bias at
0 -- would hide bugs), and writes under ``<out>/<name>/``:

* the model folder (``config.json``, ``generation_config.json``, safetensors);
* ``reference.npz`` with ``tokens`` int32 [2, 256], ``logits`` float32
  [2, 256, V], ``prompt`` int32 [2, 8], ``greedy`` int32 [2, 16] (new tokens
  of ``model.generate(prompt, max_new_tokens=16, do_sample=False)``), and the
  ``transformers_version`` / ``torch_version`` strings;
* ``reference.json`` with the same versions plus routing statistics that prove
  the MoE layers really spread tokens over several experts.

Variants: ``mixtral_fused`` (the same Mixtral, but its safetensors hold the fused
expert tensors exactly as transformers 5.x keeps them in memory, i.e.
``model.state_dict()`` written with ``safetensors.torch.save_file``),
``mistral_bf16`` (bf16 weights on disk; reference computed in float32 from the
bf16-rounded weights), ``deepseek_v3_fp8`` (hand-made DeepSeek-V3-style block
fp8 checkpoint: float8_e4m3fn weights plus float32 ``weight_scale_inv`` per
16x16 block; reference computed from the dequantised weights), and
``qwen2_moe`` is written in >= 2 shards with ``model.safetensors.index.json``.
The ``llama`` folder also gets a tiny trained ``tokenizer.json``.

How to run
----------
    python3 -m venv /tmp/hfvenv
    /tmp/hfvenv/bin/pip install torch==2.13.0 transformers safetensors tokenizers numpy
    HF_HUB_OFFLINE=1 /tmp/hfvenv/bin/python tests/hf/make_fixtures.py [--out tests/hf]
    HF_HUB_OFFLINE=1 /tmp/hfvenv/bin/python tests/hf/make_fixtures.py --check tests/hf

``--check DIR`` reloads every fixture folder with ``from_pretrained`` and asserts
its logits equal ``reference.npz`` (max abs diff <= 1e-5).  ``deepseek_v3_fp8``
cannot be loaded by transformers on CPU (its fp8 loader needs ``accelerate``, and
its CPU dequantiser rejects the partial 16x16 blocks this fixture deliberately
has), so ``--check`` dequantises that folder by hand (fp8 * scale_inv per block)
and loads the result into the float32 model instead.

Last run with transformers 5.24.0 and torch 2.13.0+cpu (printed on every run).

This file is not a test (no ``test_`` prefix) and is never imported by the
``sparse_jax`` library; only tests that skip without transformers may import
``hf_logits`` from it.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import numpy as np
import torch
import transformers
from safetensors.torch import load_file, save_file

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

# ---------------------------------------------------------------------------
# Shared sizes.
# ---------------------------------------------------------------------------
VOCAB = 128
HIDDEN = 32
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 8
INTERMEDIATE = 64
MOE_INTERMEDIATE = 16
MAX_POS = 512

BATCH, SEQ = 2, 256
PROMPT_LEN, NEW_TOKENS = 8, 16
TOKEN_SEED = 1234
FP8_BLOCK = 16
FP8_MAX = 448.0  # largest finite float8_e4m3fn
ATOL = 1e-5

# Tokens/eos: no eos so that generate never stops early; no pad/bos either.
_NO_SPECIAL = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)


def _rope(theta: float) -> dict:
    return {"rope_type": "default", "rope_theta": float(theta)}


# ---------------------------------------------------------------------------
# One function per family config.
# ---------------------------------------------------------------------------
def llama_config() -> transformers.PretrainedConfig:
    return transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
        num_hidden_layers=2, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM, max_position_embeddings=MAX_POS, rms_norm_eps=1e-5,
        rope_parameters=_rope(10000.0), tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False, **_NO_SPECIAL,
    )


def mistral_config() -> transformers.PretrainedConfig:
    # head_dim 16 != hidden/heads = 8 (as in Mistral-Nemo); no sliding window.
    return transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
        num_hidden_layers=2, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
        head_dim=16, max_position_embeddings=MAX_POS, rms_norm_eps=1e-6,
        rope_parameters=_rope(1_000_000.0), tie_word_embeddings=False,
        sliding_window=None, **_NO_SPECIAL,
    )


def mixtral_config() -> transformers.PretrainedConfig:
    # top-2 of 4, renormalised (Mixtral always renormalises).
    return transformers.MixtralConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=48,
        num_hidden_layers=2, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM, max_position_embeddings=MAX_POS, rms_norm_eps=1e-5,
        rope_parameters=_rope(1_000_000.0), tie_word_embeddings=False,
        num_local_experts=4, num_experts_per_tok=2, sliding_window=None,
        router_jitter_noise=0.0, **_NO_SPECIAL,
    )


def qwen2_moe_config() -> transformers.PretrainedConfig:
    # 3 layers, layer 1 dense via mlp_only_layers; q/k/v biases; shared expert
    # with sigmoid gate; no renormalisation of the top-k probabilities.
    return transformers.Qwen2MoeConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
        num_hidden_layers=3, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
        max_position_embeddings=MAX_POS, rms_norm_eps=1e-6,
        rope_parameters=_rope(1_000_000.0), tie_word_embeddings=False,
        use_sliding_window=False, qkv_bias=True,
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=MOE_INTERMEDIATE,
        shared_expert_intermediate_size=48, norm_topk_prob=False,
        decoder_sparse_step=1, mlp_only_layers=[1], **_NO_SPECIAL,
    )


def qwen3_moe_config() -> transformers.PretrainedConfig:
    # head_dim 16 != 32/4; per-head q/k RMSNorm; renormalised top-k; tied
    # embeddings; layer 0 dense via mlp_only_layers.
    return transformers.Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
        num_hidden_layers=3, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
        head_dim=16, max_position_embeddings=MAX_POS, rms_norm_eps=1e-6,
        rope_parameters=_rope(1_000_000.0), tie_word_embeddings=True,
        attention_bias=False, use_sliding_window=False,
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=MOE_INTERMEDIATE,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[0], **_NO_SPECIAL,
    )


def olmoe_config() -> transformers.PretrainedConfig:
    # q/k RMSNorm over the whole projection; no renormalisation; clip_qkv set
    # low enough that it really clips some q/k/v entries. Experts use
    # intermediate_size (OLMoE has no moe_intermediate_size) and every layer is MoE.
    return transformers.OlmoeConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=MOE_INTERMEDIATE,
        num_hidden_layers=2, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
        max_position_embeddings=MAX_POS, rms_norm_eps=1e-5,
        rope_parameters=_rope(10000.0), tie_word_embeddings=False,
        attention_bias=False, clip_qkv=2.0,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, **_NO_SPECIAL,
    )


def deepseek_v3_config() -> transformers.PretrainedConfig:
    # MLA with small distinct ranks / head dims, layer 0 dense, group-limited
    # sigmoid routing with correction bias, one shared expert, interleaved RoPE.
    # num_key_value_heads must equal num_attention_heads: MLA expands k/v to all
    # heads itself and the eager attention would otherwise repeat them again.
    return transformers.DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
        moe_intermediate_size=MOE_INTERMEDIATE, num_hidden_layers=3,
        num_attention_heads=HEADS, num_key_value_heads=HEADS,
        q_lora_rank=24, kv_lora_rank=20, qk_nope_head_dim=10, qk_rope_head_dim=6,
        v_head_dim=12, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2,
        n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
        first_k_dense_replace=1, max_position_embeddings=MAX_POS, rms_norm_eps=1e-6,
        rope_parameters=_rope(10000.0), rope_interleave=True, tie_word_embeddings=False,
        attention_bias=False, num_mtp_layers=0, **_NO_SPECIAL,
    )


MODEL_CLASSES = {
    "llama": transformers.LlamaForCausalLM,
    "mistral": transformers.MistralForCausalLM,
    "mixtral": transformers.MixtralForCausalLM,
    "qwen2_moe": transformers.Qwen2MoeForCausalLM,
    "qwen3_moe": transformers.Qwen3MoeForCausalLM,
    "olmoe": transformers.OlmoeForCausalLM,
    "deepseek_v3": transformers.DeepseekV3ForCausalLM,
}
CONFIGS = {
    "llama": llama_config,
    "mistral": mistral_config,
    "mixtral": mixtral_config,
    "qwen2_moe": qwen2_moe_config,
    "qwen3_moe": qwen3_moe_config,
    "olmoe": olmoe_config,
    "deepseek_v3": deepseek_v3_config,
}
SEEDS = {"llama": 1, "mistral": 2, "mixtral": 3, "qwen2_moe": 4, "qwen3_moe": 5,
         "olmoe": 6, "deepseek_v3": 7}


# ---------------------------------------------------------------------------
# Model construction and re-initialisation.
# ---------------------------------------------------------------------------
def _init_tensor(name: str, t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The fixture init rule for one learnable tensor, by name and shape."""
    shape = tuple(t.shape)
    randn = lambda: torch.randn(shape, generator=gen, dtype=torch.float32)  # noqa: E731
    if name.endswith("e_score_correction_bias"):
        # Comparable to the spread of the sigmoid scores (~0.2): changes the
        # choice for ~40-70% of tokens without starving any expert.
        return 0.1 * randn()
    if name.endswith("embed_tokens.weight"):
        return randn()
    if len(shape) == 1 and "norm" in name.rsplit(".", 2)[-2]:
        return 1.0 + 0.1 * randn()
    if len(shape) == 1 and name.endswith(".bias"):
        return 0.1 * randn()
    if len(shape) in (2, 3):
        # nn.Linear [out, in] and fused experts [E, out, in]: fan_in is the last dim.
        return randn() / math.sqrt(shape[-1])
    raise ValueError(f"no init rule for {name} {shape}")


def reinit_(model: torch.nn.Module, seed: int) -> None:
    """Re-initialise every learnable parameter and persistent buffer."""
    gen = torch.Generator().manual_seed(seed)
    persistent = set(model.state_dict().keys())
    seen = set()
    tensors = dict(model.named_parameters())
    tensors.update({n: b for n, b in model.named_buffers() if n in persistent})
    with torch.no_grad():
        for name in sorted(tensors):
            t = tensors[name]
            if t.data_ptr() in seen:  # tied weights (lm_head = embed_tokens)
                continue
            seen.add(t.data_ptr())
            t.copy_(_init_tensor(name, t, gen))


def build_model(family: str, seed: int) -> torch.nn.Module:
    config = CONFIGS[family]()
    config._attn_implementation = "eager"  # the plain softmax(QK^T*scale)V path
    config._experts_implementation = "eager"  # the per-expert loop (same numbers as grouped_mm)
    torch.manual_seed(seed)
    model = MODEL_CLASSES[family](config).to(torch.float32)
    reinit_(model, seed)
    model.eval()
    _fix_generation_config(model)
    return model


def _fix_generation_config(model) -> None:
    gc = model.generation_config
    gc.eos_token_id = None
    gc.bos_token_id = None
    gc.pad_token_id = 0  # only used to pad finished rows; none finish (no eos)
    gc.do_sample = False


# ---------------------------------------------------------------------------
# Reference outputs.
# ---------------------------------------------------------------------------
def fixed_tokens() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(TOKEN_SEED)
    tokens = rng.integers(0, VOCAB, size=(BATCH, SEQ), dtype=np.int64).astype(np.int32)
    prompt = rng.integers(0, VOCAB, size=(BATCH, PROMPT_LEN), dtype=np.int64).astype(np.int32)
    return tokens, prompt


@torch.no_grad()
def model_logits(model, tokens: np.ndarray) -> np.ndarray:
    out = model(input_ids=torch.as_tensor(tokens, dtype=torch.long), use_cache=False)
    return out.logits.to(torch.float32).numpy()


@torch.no_grad()
def greedy(model, prompt: np.ndarray) -> np.ndarray:
    ids = torch.as_tensor(prompt, dtype=torch.long)
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
        do_sample=False, eos_token_id=None, pad_token_id=0,
    )
    new = out[:, PROMPT_LEN:].numpy().astype(np.int32)
    assert new.shape == (BATCH, NEW_TOKENS), new.shape
    # Cross-check the KV-cache path against plain argmax over full forwards.
    seq = ids.clone()
    for _ in range(NEW_TOKENS):
        nxt = model(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert np.array_equal(seq[:, PROMPT_LEN:].numpy(), new), "generate != no-cache greedy"
    return new


def hf_logits(folder, tokens) -> np.ndarray:
    """Load a fixture folder with transformers and return float32 logits.

    For tests that may import this when transformers/torch are installed.
    """
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=torch.float32, attn_implementation="eager",
        experts_implementation="eager",
    )
    model.eval()
    return model_logits(model, np.asarray(tokens))


# ---------------------------------------------------------------------------
# Routing statistics (proof that the MoE layers spread tokens).
# ---------------------------------------------------------------------------
def _router_modules(model):
    for name, mod in model.named_modules():
        cls = type(mod).__name__
        if cls.endswith("TopKRouter") or cls.endswith("TopkRouter"):
            yield name, mod


@torch.no_grad()
def routing_stats(model, tokens: np.ndarray) -> dict:
    captured = {}
    hooks = []
    for name, mod in _router_modules(model):
        def hook(m, inp, out, name=name):
            captured[name] = (inp[0].detach().reshape(-1, inp[0].shape[-1]).clone(), out[2].detach().clone())
        hooks.append(mod.register_forward_hook(hook))
    model_logits(model, tokens)
    for h in hooks:
        h.remove()
    stats = {}
    for name, mod in _router_modules(model):
        x, idx = captured[name]
        counts = torch.bincount(idx.reshape(-1), minlength=mod.num_experts).tolist()
        entry = {"tokens_per_expert": counts}
        assert min(counts) > 0, ("an expert gets no token", name, counts)
        assert max(counts) < 0.8 * idx.shape[0], ("one expert takes most tokens", name, counts)
        if hasattr(mod, "e_score_correction_bias"):
            # Which selections would change without the group limit?
            sfc = torch.sigmoid(x.float() @ mod.weight.float().T) + mod.e_score_correction_bias
            plain = sfc.topk(mod.top_k, dim=-1).indices
            changed = (idx.sort(-1).values != plain.sort(-1).values).any(-1)
            entry["frac_tokens_changed_by_group_limit"] = float(changed.float().mean())
            assert changed.any(), "group limit does not change routing"
            # Which selections would change without the correction bias?
            bias = mod.e_score_correction_bias.clone()
            mod.e_score_correction_bias.zero_()
            _, _, idx0 = mod(x)
            mod.e_score_correction_bias.copy_(bias)
            changed = (idx.sort(-1).values != idx0.sort(-1).values).any(-1)
            entry["frac_tokens_changed_by_correction_bias"] = float(changed.float().mean())
            assert changed.any(), "correction bias does not change routing"
        stats[name] = entry
    return stats


@torch.no_grad()
def clip_stats(model, tokens: np.ndarray) -> dict:
    """Fraction of q/k/v entries OLMoE's clip_qkv actually clips."""
    clip = model.config.clip_qkv
    fr = {}
    hooks = []
    for name, mod in model.named_modules():
        if name.endswith(("self_attn.q_norm", "self_attn.k_norm", "self_attn.v_proj")):
            def hook(m, inp, out, name=name):
                fr[name] = float((out.abs() > clip).float().mean())
            hooks.append(mod.register_forward_hook(hook))
    model_logits(model, tokens)
    for h in hooks:
        h.remove()
    assert any(v > 0 for v in fr.values()), "clip_qkv never clips"
    return fr


# ---------------------------------------------------------------------------
# Writing folders.
# ---------------------------------------------------------------------------
def _versions() -> dict:
    return {"transformers_version": transformers.__version__, "torch_version": torch.__version__}


def write_reference(folder: Path, model, tokens, prompt, extra: dict | None = None) -> np.ndarray:
    logits = model_logits(model, tokens)
    gen = greedy(model, prompt)
    v = _versions()
    np.savez_compressed(
        folder / "reference.npz", tokens=tokens, logits=logits.astype(np.float32),
        prompt=prompt, greedy=gen,
        transformers_version=np.array(v["transformers_version"]),
        torch_version=np.array(v["torch_version"]),
    )
    meta = dict(v)
    meta.update(extra or {})
    (folder / "reference.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return logits


def _fresh(folder: Path) -> Path:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def save_standard(model, folder: Path, **kw) -> None:
    model.save_pretrained(str(folder), **kw)


def _moe_extra(model, tokens, family) -> dict:
    extra = {"seed": SEEDS[family], "family": family}
    if any(True for _ in _router_modules(model)):
        extra["routing"] = routing_stats(model, tokens)
    if family == "olmoe":
        extra["clip_qkv_fraction_clipped"] = clip_stats(model, tokens)
    return extra


def make_family(family: str, out: Path, tokens, prompt, **save_kw) -> None:
    model = build_model(family, SEEDS[family])
    folder = _fresh(out / family)
    save_standard(model, folder, **save_kw)
    write_reference(folder, model, tokens, prompt, _moe_extra(model, tokens, family))


def make_mixtral_fused(out: Path, tokens, prompt) -> None:
    """Same Mixtral (same seed) as `mixtral`, fused expert tensors on disk."""
    model = build_model("mixtral", SEEDS["mixtral"])
    folder = _fresh(out / "mixtral_fused")
    model.config.architectures = [type(model).__name__]
    model.config.dtype = torch.float32  # what save_pretrained would record
    model.config.save_pretrained(str(folder))
    model.generation_config.save_pretrained(str(folder))
    sd = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    write_reference(folder, model, tokens, prompt,
                    {"seed": SEEDS["mixtral"], "family": "mixtral", "layout": "fused state_dict()"})


def make_mistral_bf16(out: Path, tokens, prompt) -> None:
    model = build_model("mistral", SEEDS["mistral"])
    with torch.no_grad():  # round the weights (not the RoPE inv_freq buffer!) to bf16
        for p in model.state_dict().values():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
    folder = _fresh(out / "mistral_bf16")
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(str(folder))
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16", cfg
    # Reference: float32 model holding the bf16-rounded weights, with the exact
    # float32 RoPE frequencies (model.to(bf16).to(f32) would round inv_freq too).
    write_reference(folder, model, tokens, prompt,
                    {"seed": SEEDS["mistral"], "family": "mistral",
                     "note": "logits in float32 from bf16-rounded weights"})


# --- DeepSeek-V3 block fp8 ---------------------------------------------------
_FP8_TARGETS = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
                "gate_proj", "up_proj", "down_proj")


def _is_fp8_target(name: str) -> bool:
    parts = name.split(".")
    return (name.endswith(".weight") and len(parts) >= 2 and parts[-2] in _FP8_TARGETS
            and (".self_attn." in name or ".mlp." in name))


def fp8_quantize(w: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block e4m3 quantisation: w ~= q.float() * scale_inv (block-broadcast)."""
    out_f, in_f = w.shape
    bo, bi = math.ceil(out_f / block), math.ceil(in_f / block)
    padded = torch.zeros(bo * block, bi * block, dtype=torch.float32)
    padded[:out_f, :in_f] = w.float()
    blocks = padded.view(bo, block, bi, block)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale_inv = (amax / FP8_MAX).to(torch.float32)  # [bo, bi]
    q = (blocks / scale_inv[:, None, :, None]).to(torch.float8_e4m3fn)
    q = q.view(bo * block, bi * block)[:out_f, :in_f].contiguous()
    return q, scale_inv.contiguous()


def fp8_dequantize(q: torch.Tensor, scale_inv: torch.Tensor, block: int = FP8_BLOCK) -> torch.Tensor:
    s = scale_inv.repeat_interleave(block, 0).repeat_interleave(block, 1)
    return q.to(torch.float32) * s[: q.shape[0], : q.shape[1]]


def _read_folder_tensors(folder: Path) -> dict:
    sd = {}
    for f in sorted(folder.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd


def dequantize_folder_tensors(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        if k.endswith("_scale_inv"):
            continue
        if v.dtype == torch.float8_e4m3fn:
            out[k] = fp8_dequantize(v, sd[k + "_scale_inv"])
        else:
            out[k] = v.to(torch.float32)
    return out


def make_deepseek_v3_fp8(out: Path, tokens, prompt) -> None:
    model = build_model("deepseek_v3", SEEDS["deepseek_v3"])
    folder = _fresh(out / "deepseek_v3_fp8")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model.save_pretrained(str(tmp / "f32"))  # checkpoint (per-expert) names
        sd = _read_folder_tensors(tmp / "f32")
        qsd, deq = {}, {}
        n_q = 0
        for k, v in sorted(sd.items()):
            if _is_fp8_target(k):
                q, s = fp8_quantize(v)
                qsd[k], qsd[k + "_scale_inv"] = q, s
                deq[k] = fp8_dequantize(q, s)
                n_q += 1
            else:
                qsd[k] = v.contiguous()
                deq[k] = v
        assert n_q > 0
        # Reference: the dequantised weights loaded into the float32 model the
        # ordinary way (same name conversion as any per-expert checkpoint).
        (tmp / "deq").mkdir()
        shutil.copy(tmp / "f32" / "config.json", tmp / "deq" / "config.json")
        save_file(deq, str(tmp / "deq" / "model.safetensors"), metadata={"format": "pt"})
        ref_model = transformers.AutoModelForCausalLM.from_pretrained(
            str(tmp / "deq"), dtype=torch.float32, attn_implementation="eager")
        ref_model.eval()
        _fix_generation_config(ref_model)
        max_err = max(float((deq[k] - sd[k]).abs().max()) for k in deq)

    save_file(qsd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(str(folder))
    model.generation_config.save_pretrained(str(folder))
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3",
                                  "activation_scheme": "dynamic",
                                  "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    write_reference(folder, ref_model, tokens, prompt,
                    {"seed": SEEDS["deepseek_v3"], "family": "deepseek_v3",
                     "fp8_quantized_tensors": n_q, "max_abs_weight_quant_error": max_err,
                     "note": "logits from the dequantised (fp8 * scale_inv) weights in float32"})


# --- tokenizer ---------------------------------------------------------------
TOKENIZER_TEXT = (
    "The quick brown fox jumps over the lazy dog. A sparse mixture of experts "
    "routes every token to a few experts, and the router learns which expert "
    "fits which token. Attention looks back over the sequence; rotary position "
    "embeddings rotate queries and keys. Small models make fast tests, and fast "
    "tests make happy engineers. The dog sleeps, the fox runs, the experts route. "
    "Numbers like 12, 345 and 6789 appear too, as do punctuation marks: ! ? ; ( )."
)
TOKENIZER_SAMPLE = "the fox routes a token to experts."


def make_tokenizer(folder: Path) -> dict:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"],
                                  show_progress=False)
    tok.train_from_iterator([TOKENIZER_TEXT] * 4, trainer=trainer)
    assert tok.get_vocab_size() <= VOCAB
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(folder))
    # transformers 5 writes "TokenizersBackend"; the 4.x name loads in both.
    tc = json.loads((folder / "tokenizer_config.json").read_text())
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    (folder / "tokenizer_config.json").write_text(json.dumps(tc, indent=2, sort_keys=True) + "\n")
    ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(TOKENIZER_SAMPLE).ids
    auto = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert auto(TOKENIZER_SAMPLE, add_special_tokens=False)["input_ids"] == ids
    assert max(ids) < VOCAB
    return {"text": TOKENIZER_SAMPLE, "ids": ids, "vocab_size": tok.get_vocab_size()}


# ---------------------------------------------------------------------------
# Driver and --check.
# ---------------------------------------------------------------------------
FOLDERS = ["llama", "mistral", "mistral_bf16", "mixtral", "mixtral_fused", "qwen2_moe",
           "qwen3_moe", "olmoe", "deepseek_v3", "deepseek_v3_fp8"]


def generate_all(out: Path) -> None:
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    tokens, prompt = fixed_tokens()
    make_family("llama", out, tokens, prompt)
    tok_info = make_tokenizer(out / "llama")
    meta = json.loads((out / "llama" / "reference.json").read_text())
    meta["tokenizer_sample"] = tok_info
    (out / "llama" / "reference.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    make_family("mistral", out, tokens, prompt)
    make_mistral_bf16(out, tokens, prompt)
    make_family("mixtral", out, tokens, prompt)
    make_mixtral_fused(out, tokens, prompt)
    make_family("qwen2_moe", out, tokens, prompt, max_shard_size="80KB")
    shards = sorted((out / "qwen2_moe").glob("model-*.safetensors"))
    assert len(shards) >= 2 and (out / "qwen2_moe" / "model.safetensors.index.json").exists(), shards
    make_family("qwen3_moe", out, tokens, prompt)
    make_family("olmoe", out, tokens, prompt)
    make_family("deepseek_v3", out, tokens, prompt)
    make_deepseek_v3_fp8(out, tokens, prompt)
    for name in FOLDERS:
        cfg = json.loads((out / name / "config.json").read_text())
        assert cfg["architectures"] == [MODEL_CLASSES[cfg["model_type"]].__name__], (name, cfg)


def _fp8_manual_logits(folder: Path, tokens) -> np.ndarray:
    """Dequantise an fp8 fixture by hand and run it in the float32 model."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = json.loads((folder / "config.json").read_text())
        cfg.pop("quantization_config")
        (Path(tmp) / "config.json").write_text(json.dumps(cfg))
        deq = dequantize_folder_tensors(_read_folder_tensors(folder))
        save_file(deq, str(Path(tmp) / "model.safetensors"), metadata={"format": "pt"})
        return hf_logits(tmp, tokens)


def check_all(root: Path) -> int:
    failures = 0
    for folder in sorted(p.parent for p in root.glob("*/reference.npz")):
        ref = np.load(folder / "reference.npz")
        how = "from_pretrained"
        try:
            got = hf_logits(folder, ref["tokens"])
        except Exception as e:  # noqa: BLE001
            if folder.name != "deepseek_v3_fp8":
                raise
            how = f"manual dequant (from_pretrained failed: {type(e).__name__}: {str(e)[:80]})"
            got = _fp8_manual_logits(folder, ref["tokens"])
        err = float(np.abs(got - ref["logits"]).max())
        ok = err <= ATOL
        failures += not ok
        print(f"{'OK ' if ok else 'BAD'} {folder.name:16s} max|diff|={err:.3g}  [{how}]")
        if folder.name == "deepseek_v3_fp8" and how == "from_pretrained":
            # transformers' own fp8 loader worked; also prove our dequant rule.
            err2 = float(np.abs(_fp8_manual_logits(folder, ref["tokens"]) - ref["logits"]).max())
            print(f"    deepseek_v3_fp8 manual dequant max|diff|={err2:.3g}")
            failures += err2 > ATOL
    return failures


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent))
    ap.add_argument("--check", metavar="DIR", default=None)
    args = ap.parse_args(argv)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    if args.check:
        bad = check_all(Path(args.check))
        print("all fixtures reload exactly" if not bad else f"{bad} fixture(s) differ")
        return 1 if bad else 0
    generate_all(Path(args.out))
    print(f"wrote fixtures under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
