"""The supported architectures (config.json's `architectures`), one Family each."""
from __future__ import annotations

from sparse_jax.hub.deepseek import DeepseekV3
from sparse_jax.hub.llama import Decoder, Mistral
from sparse_jax.hub.mixtral import Mixtral
from sparse_jax.hub.olmoe import Olmoe
from sparse_jax.hub.qwen_moe import Qwen2Moe, Qwen3Moe

FAMILIES: dict[str, Decoder] = {f.architecture: f for f in (
    Decoder(), Mistral(), Mixtral(), Qwen2Moe(), Qwen3Moe(), Olmoe(), DeepseekV3())}
