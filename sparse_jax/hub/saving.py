"""A model -> a Hugging Face folder that transformers' from_pretrained reads.

Tensors are written under transformers' own on-disk names (one tensor per expert), in
safetensors shards with an index when the model is large, one parameter gathered to the
host at a time. config.json takes the source folder's fields where given (token ids,
context length, ...) and the model's own for everything the model determines, so a
pruned model's zeros and a compacted model's expert count are what is exported.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from sparse_jax.hub import safetensors as st
from sparse_jax.hub.families import FAMILIES
from sparse_jax.hub.loading import HubError, _key
from sparse_jax.models import TransformerLM, relayout
from sparse_jax.specs import ModelSpec

# Files of a source folder that travel with the weights.
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json',
                   'generation_config.json', 'tokenizer.model', 'vocab.json', 'merges.txt')


def _host(x: jax.Array) -> np.ndarray:
  if jax.process_count() > 1:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def save_hf(model: TransformerLM, spec: ModelSpec, path: str | os.PathLike, *,
            source: str | os.PathLike | None = None,
            max_shard_bytes: int = 5 << 30) -> pathlib.Path:
  """Writes `model` into the new folder `path` (its parent must exist; an existing
  non-empty folder is refused). `source`: the folder it was imported from, whose
  config.json fields the model does not determine, and tokenizer files, are kept.
  The folder appears whole or not at all (written beside it, then renamed)."""
  if spec.architecture not in FAMILIES:
    raise HubError('this model has no model.architecture: only a model imported with '
                   'sparse_jax.hub.load_hf (or one whose config sets model.architecture to '
                   f'one of {", ".join(FAMILIES)}) can be exported')
  out = pathlib.Path(path)
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise HubError(f'{out} already exists and is not an empty folder; give a new path')
  family = FAMILIES[spec.architecture]
  params = {_key(p): v for p, v in nnx.to_flat_state(nnx.state(relayout(model, False)))}
  dtype = np.dtype(jax.numpy.dtype(spec.param_dtype))
  tensors, cache = [], {}

  def produce(param: str, source, name: str):
    def run():
      if cache.get('param') != param:           # gather each parameter once
        cache.update(param=param, tensors=source.export(_host(params[param][...])))
      return cache['tensors'][name]
    return run

  for param, src in family.tensors(spec).items():
    for name, shape in src.expected(tuple(params[param].shape)).items():
      want = dtype if isinstance(params[param], nnx.Param) else np.dtype(params[param].dtype)
      tensors.append(st.Tensor(name, shape, want, produce(param, src, name)))

  base = {}
  if source is not None and (pathlib.Path(source) / 'config.json').exists():
    base = json.loads((pathlib.Path(source) / 'config.json').read_text())
    base.pop('quantization_config', None)           # written in the model's float dtype
  config = {**base, **family.hf_config(spec), 'dtype': str(dtype), 'torch_dtype': str(dtype)}
  if jax.process_index() != 0:
    for t in tensors:                            # every process takes part in the gathers
      t.produce()
    return out
  work = out.with_name(f'.{out.name}.incomplete')
  shutil.rmtree(work, ignore_errors=True)
  work.mkdir()
  st.write(work, tensors, max_shard_bytes=max_shard_bytes)
  (work / 'config.json').write_text(json.dumps(config, indent=2, sort_keys=True) + '\n')
  for name in TOKENIZER_FILES:
    if source is not None and (pathlib.Path(source) / name).exists():
      shutil.copy2(pathlib.Path(source) / name, work / name)
  if out.exists():
    out.rmdir()
  os.rename(work, out)
  return out
