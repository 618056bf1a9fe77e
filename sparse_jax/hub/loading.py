"""A Hugging Face model folder -> the config of its model, checked, and the model itself.

Everything that can be wrong with a folder is found before a parameter is built: no
config.json, an architecture or setting the model cannot compute, a truncated or corrupt
safetensors file, a tensor missing, of the wrong shape, or used by nothing. Each is a
HubError whose one line names the file or the tensor. Parameters are then read straight
from the files onto the mesh: every device's part is read from its slice of the file
(safetensors.load), so the process never holds the whole checkpoint in host memory.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from sparse_jax import sharding
from sparse_jax.config import ConfigError, base_config, model_spec, validate
from sparse_jax.hub import safetensors as st
from sparse_jax.hub.families import FAMILIES
from sparse_jax.hub.llama import Decoder, Unsupported
from sparse_jax.models import TransformerLM, relayout
from sparse_jax.specs import ModelSpec

_FLOATS = tuple(np.dtype(st.DTYPES[k]) for k in ('F64', 'F32', 'F16', 'BF16'))
_FP8 = np.dtype(st.DTYPES['F8_E4M3'])


class HubError(ValueError):
  """A folder that cannot be imported (or a model that cannot be exported); one line."""


def folder_of(path: str | os.PathLike) -> pathlib.Path:
  """A local folder, or a Hub repository id ('org/name') already in the local Hugging
  Face cache (resolved offline with huggingface_hub; nothing is downloaded)."""
  p = pathlib.Path(path).expanduser()
  if p.is_dir() or p.exists() or str(path).startswith(('.', '/', '~')) or str(path).count('/') != 1:
    return p
  try:
    from huggingface_hub import snapshot_download
  except ImportError:
    return p
  try:
    return pathlib.Path(snapshot_download(str(path), local_files_only=True))
  except Exception:  # pylint: disable=broad-except  # not cached: report the path below
    return p


def read_config(folder: pathlib.Path) -> tuple[dict, Decoder]:
  """(config.json as a dict, its Family)."""
  if not folder.is_dir():
    raise HubError(f'{folder} is not a folder; give a Hugging Face model folder (the one '
                   'holding config.json and *.safetensors) or a repository id in the local '
                   'Hugging Face cache')
  path = folder / 'config.json'
  if not path.exists():
    raise HubError(f'{folder} has no config.json; give the Hugging Face model folder that '
                   'holds config.json and the *.safetensors files')
  try:
    hf = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise HubError(f'{path} is not valid JSON ({e})') from None
  arch = (hf.get('architectures') or [None])[0]
  if arch not in FAMILIES:
    raise HubError(f'{path}: architectures={hf.get("architectures")} is not supported; '
                   f'supported: {", ".join(FAMILIES)}')
  q = hf.get('quantization_config')
  if q and not (q.get('quant_method') == 'fp8' and q.get('fmt', 'e4m3') == 'e4m3'
                and len(q.get('weight_block_size') or ()) == 2):
    raise HubError(f'{path}: quantization_config {q} is not supported; give float32, '
                   'float16 or bfloat16 weights, or fp8 e4m3 ones with a weight_block_size '
                   '(DeepSeek-V3)')
  return hf, FAMILIES[arch]


def import_config(path: str | os.PathLike) -> ml_collections.ConfigDict:
  """The sparse_jax config of a folder's model (base_config() with model.* and moe.*
  set from config.json; train.* and mesh.* at their defaults)."""
  folder = folder_of(path)
  hf, family = read_config(folder)
  try:
    keys = family.config(hf)
  except Unsupported as e:
    raise HubError(f'{folder / "config.json"}: {e}') from None
  except KeyError as e:
    raise HubError(f'{folder / "config.json"} lacks {e}, which {family.architecture} '
                   'needs') from None
  c = base_config()
  for key, value in keys.items():
    group, name = key.split('.')
    c[group][name] = value
  return c


class Plan(NamedTuple):
  """Which tensors of the folder fill which variable of the model."""
  entries: dict                       # tensor name -> safetensors.Entry | Fp8Entry
  sources: dict[str, object]          # variable path -> tensors.Source


class Fp8Entry(NamedTuple):
  """A float8 e4m3 weight [out, in] with its weight_scale_inv [ceil(out/bo), ceil(in/bi)]:
  read() gives float32 weight * scale, each (bo, bi) block by its own scale."""
  file: pathlib.Path
  shape: tuple[int, ...]
  weight: st.Entry
  scale: st.Entry
  block: tuple[int, int]
  dtype = np.dtype(np.float32)

  def read(self, index: tuple = ()) -> np.ndarray:
    o, i = (slice(*s.indices(n)) for s, n in zip(tuple(index) + (slice(None),) * 2, self.shape))
    w = self.weight.read((o, i)).astype(np.float32)
    rows = np.arange(o.start, o.stop) // self.block[0]
    cols = np.arange(i.start, i.stop) // self.block[1]
    return w * self.scale.read()[rows][:, cols].astype(np.float32)


def _dequantized(entries: dict, hf: dict) -> tuple[dict, set]:
  """entries with every fp8 weight replaced by its Fp8Entry; and the scale names used."""
  q = hf.get('quantization_config') or {}
  out, scales = dict(entries), set()
  for name, e in entries.items():
    if e.dtype != _FP8:
      continue
    scale = entries.get(f'{name}_scale_inv')
    bo, bi = (q.get('weight_block_size') or (None, None))
    if scale is None or bo is None or len(e.shape) != 2:
      raise HubError(f'{e.file}: tensor {name} is float8 without a 2-D layout, a '
                     f'{name}_scale_inv tensor and quantization_config.weight_block_size')
    want = (-(-e.shape[0] // bo), -(-e.shape[1] // bi))
    if scale.shape != want:
      raise HubError(f'{scale.file}: tensor {name}_scale_inv has shape {list(scale.shape)}, '
                     f'but blocks of {bo}x{bi} over {list(e.shape)} make it {list(want)}')
    out[name] = Fp8Entry(e.file, e.shape, e, scale, (bo, bi))
    scales.add(f'{name}_scale_inv')
  return out, scales


def _variable_shapes(spec: ModelSpec) -> tuple[dict[str, tuple], set[str]]:
  """({path: shape} of every variable of the model unrolled, the paths that are
  nnx.Params): the folder's tensors are per layer."""
  spec = dataclasses.replace(spec, scan_layers=False)
  model = nnx.eval_shape(lambda: TransformerLM(spec, rngs=nnx.Rngs(0)))
  flat = nnx.to_flat_state(nnx.state(model))
  return ({_key(p): tuple(v.shape) for p, v in flat},
          {_key(p) for p, v in flat if isinstance(v, nnx.Param)})


def _key(path) -> str:
  return '/'.join(str(k) for k in path)


def plan(folder: pathlib.Path, spec: ModelSpec) -> Plan:
  """Every parameter's source, checked against the folder's files (HubError)."""
  hf, family = read_config(folder)
  try:
    entries = st.read_folder(folder)
  except st.FormatError as e:
    raise HubError(str(e)) from None
  entries, used = _dequantized(entries, hf)
  sources = family.tensors(spec, frozenset(entries))
  shapes, params = _variable_shapes(spec)
  # A family's own bug, not the folder's: every parameter has a source, every source a
  # variable (state such as the router's selection bias may come from the folder too).
  assert params <= set(sources) <= set(shapes), (params ^ set(sources))
  for path, source in sources.items():
    for name, want in source.expected(shapes[path]).items():
      if name not in entries:
        raise HubError(f'{folder}: tensor {name} is missing ({family.architecture} with '
                       'this config.json needs it)')
      e = entries[name]
      if e.shape != want:
        raise HubError(f'{e.file}: tensor {name} has shape {list(e.shape)}, but config.json '
                       f'makes it {list(want)}')
      if e.dtype not in _FLOATS:
        raise HubError(f'{e.file}: tensor {name} is {e.dtype}; give float32, float16 or '
                       'bfloat16 weights')
      used.add(name)
  unused = sorted(n for n in set(entries) - used if not family.skipped(hf, n))
  if unused:
    raise HubError(f'{entries[unused[0]].file}: tensor {unused[0]} is used by nothing in '
                   f'{family.architecture} with this config.json'
                   f'{f" (and {len(unused) - 1} more)" if len(unused) > 1 else ""}; is '
                   'config.json the one these weights were saved with?')
  return Plan(entries, sources)


def build(spec: ModelSpec, p: Plan, mesh: Mesh | None = None, *,
          fsdp: bool = False) -> TransformerLM:
  """The model of `spec` with every parameter read from the plan's files, each device
  reading its own part (with `mesh`: the shardings training uses, split over 'data' too
  with fsdp); a scanned spec is read unrolled, then stacked."""
  if spec.scan_layers:
    return relayout(build(dataclasses.replace(spec, scan_layers=False), p, mesh, fsdp=fsdp),
                    True)
  abstract = nnx.eval_shape(lambda: TransformerLM(spec, mesh=mesh, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    where = jax.tree.map(lambda _: device, state)
  else:
    where = sharding.state_shardings(state, mesh, fsdp=fsdp)
  places = dict(nnx.to_flat_state(where))
  dtype = jnp.dtype(spec.param_dtype)
  out = []
  for path, var in nnx.to_flat_state(state):
    shape, at = tuple(var.shape), places[path]
    at = at.get_value() if isinstance(at, nnx.Variable) else at
    source = p.sources.get(_key(path))
    if source is None and jax.dtypes.issubdtype(var.dtype, jax.dtypes.prng_key):
      value = jax.device_put(jax.random.key(0), at)      # the router's jitter stream
    elif source is None:                      # state the folder does not hold: zeros
      value = jax.device_put(jnp.zeros(shape, var.dtype), at)
    else:
      want = dtype if isinstance(var, nnx.Param) else var.dtype
      read = lambda index, s=source, shape=shape, want=want: s.read(
          p.entries, index, shape).astype(want)
      value = jax.make_array_from_callback(shape, at, read)
    out.append((path, var.replace(value)))
  return nnx.merge(graphdef, nnx.from_flat_state(out))


def load_hf(path: str | os.PathLike, *, mesh: Mesh | None = None,
            fsdp: bool = False) -> tuple[TransformerLM, ModelSpec]:
  """(model, spec) of a Hugging Face folder (or a cached repository id), on `mesh` if
  given (any shape: the experts are split over its 'expert' axis), else on one device.
  MoE layers route dropless, as the published models were trained. HubError (one line)
  for anything the folder's files or settings do not allow."""
  folder = folder_of(path)
  config = import_config(folder)
  try:
    validate(config, 1)                     # the model keys; the mesh is the caller's
  except ConfigError as e:
    raise HubError(f'{folder / "config.json"}: {e}') from None
  spec = model_spec(config)
  if mesh is not None and spec.moe and spec.moe.num_experts % sharding.axis_size(mesh, 'expert'):
    raise HubError(f'the {spec.moe.num_experts} experts of {folder} do not split over the '
                   f"mesh's expert axis of size {sharding.axis_size(mesh, 'expert')}")
  return build(spec, plan(folder, spec), mesh, fsdp=fsdp), spec
