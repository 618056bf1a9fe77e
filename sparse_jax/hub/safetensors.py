"""The safetensors format, read tensor by tensor and written as a stream.

A file is an 8-byte little-endian header length N, N bytes of JSON ({name: {dtype, shape,
data_offsets: [begin, end]}, '__metadata__': {...}}) and the data, offsets counted from
its start. Reading maps one tensor at a time (numpy.memmap), so a slice reads only the
pages it touches and a process never holds a whole checkpoint; writing lays out the
header first from the tensors' shapes and then writes each tensor as it is produced.
A model split over several files has an index, MODEL.safetensors.index.json, whose
weight_map names the file of every tensor.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import struct
from typing import Callable, Iterable, NamedTuple

import ml_dtypes
import numpy as np

DTYPES = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16,
          'BF16': ml_dtypes.bfloat16, 'F8_E4M3': ml_dtypes.float8_e4m3fn,
          'F8_E5M2': ml_dtypes.float8_e5m2, 'I64': np.int64, 'I32': np.int32,
          'I16': np.int16, 'I8': np.int8, 'U8': np.uint8, 'BOOL': np.bool_}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
INDEX = 'model.safetensors.index.json'
_MAX_HEADER = 100 << 20               # the format's own bound on the JSON header


class FormatError(ValueError):
  """A file that is not a whole, well-formed safetensors file; the message names it."""


class Entry(NamedTuple):
  file: pathlib.Path
  dtype: np.dtype
  shape: tuple[int, ...]
  offset: int                          # from the start of the file

  def read(self, index: tuple = ()) -> np.ndarray:
    return load(self, index)


def read_header(path: pathlib.Path) -> dict[str, Entry]:
  """{tensor name: Entry} of one file, checked against the file's size."""
  size = path.stat().st_size
  with open(path, 'rb') as f:
    head = f.read(8)
    if len(head) < 8:
      raise FormatError(f'{path} is not a safetensors file ({size} bytes, no header)')
    (n,) = struct.unpack('<Q', head)
    if n > min(_MAX_HEADER, size - 8):
      raise FormatError(f'{path} is truncated or not a safetensors file (its header claims '
                        f'{n:,} bytes of a {size:,}-byte file)')
    try:
      header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise FormatError(f'{path} has a corrupt header ({e})') from None
  if not isinstance(header, dict):
    raise FormatError(f'{path} has a corrupt header (not a JSON object)')
  out, end = {}, 0
  for name, meta in header.items():
    if name == '__metadata__':
      continue
    try:
      dtype, shape = np.dtype(DTYPES[meta['dtype']]), tuple(int(d) for d in meta['shape'])
      begin, stop = (int(o) for o in meta['data_offsets'])
    except (KeyError, TypeError, ValueError):
      raise FormatError(f'{path}: tensor {name} has a corrupt entry {meta!r}') from None
    if stop - begin != math.prod(shape) * dtype.itemsize or begin < 0:
      raise FormatError(f'{path}: tensor {name} spans bytes [{begin}, {stop}), which does '
                        f'not hold {meta["dtype"]}{list(shape)}')
    out[name] = Entry(path, dtype, shape, 8 + n + begin)
    end = max(end, stop)
  if 8 + n + end > size:
    raise FormatError(f'{path} is truncated: its tensors need {8 + n + end:,} bytes, the '
                      f'file has {size:,}')
  return out


def read_folder(folder: pathlib.Path) -> dict[str, Entry]:
  """{tensor name: Entry} of a model folder: the files its index names, or every
  *.safetensors file in it. A name found in two files is an error."""
  index = folder / INDEX
  if index.exists():
    try:
      files = sorted(set(json.loads(index.read_text())['weight_map'].values()))
    except (json.JSONDecodeError, KeyError, AttributeError) as e:
      raise FormatError(f'{index} is not a safetensors index ({e})') from None
  else:
    files = sorted(p.name for p in folder.glob('*.safetensors'))
  if not files:
    raise FormatError(f'{folder} holds no *.safetensors file')
  out = {}
  for name in files:
    path = folder / name
    if not path.exists():
      raise FormatError(f'{index} names {name}, which is not in {folder}')
    for tensor, entry in read_header(path).items():
      if tensor in out:
        raise FormatError(f'tensor {tensor} is in both {out[tensor].file.name} and {name}')
      out[tensor] = entry
  return out


def load(entry: Entry, index: tuple = ()) -> np.ndarray:
  """entry's tensor (or the part `index` selects, a tuple of slices/ints) as a new array.
  Only the pages the slice touches are read; the mapping is closed before returning."""
  mm = np.memmap(entry.file, dtype=entry.dtype, mode='r', offset=entry.offset,
                 shape=entry.shape or (1,))
  try:
    return np.array(mm[index] if entry.shape else mm[0])
  finally:
    del mm


class Tensor(NamedTuple):
  """One tensor to write: produce() returns an array of this shape and dtype."""
  name: str
  shape: tuple[int, ...]
  dtype: np.dtype
  produce: Callable[[], np.ndarray]


def write(folder: pathlib.Path, tensors: Iterable[Tensor], *,
          max_shard_bytes: int = 5 << 30, metadata: dict | None = None) -> list[str]:
  """Writes the tensors into model.safetensors, or into model-0000i-of-0000n.safetensors
  shards of at most max_shard_bytes each (a larger tensor gets a shard to itself) with an
  index. Each tensor is produced, written and dropped in turn. Returns the file names."""
  tensors = list(tensors)
  shards, size = [[]], 0
  for t in tensors:
    n = math.prod(t.shape) * np.dtype(t.dtype).itemsize
    if shards[-1] and size + n > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(t)
    size += n
  names = (['model.safetensors'] if len(shards) == 1 else
           [f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors' for i in range(len(shards))])
  meta = {'format': 'pt', **(metadata or {})}    # transformers refuses a file without it
  for name, shard in zip(names, shards):
    _write_file(folder / name, shard, meta)
  if len(shards) > 1:
    total = sum(math.prod(t.shape) * np.dtype(t.dtype).itemsize for t in tensors)
    index = {'metadata': {'total_size': total},
             'weight_map': {t.name: n for n, shard in zip(names, shards) for t in shard}}
    (folder / INDEX).write_text(json.dumps(index, indent=2) + '\n')
  return names


def _write_file(path: pathlib.Path, tensors: list[Tensor], metadata: dict) -> None:
  header, offset = {'__metadata__': {k: str(v) for k, v in metadata.items()}}, 0
  for t in tensors:
    n = math.prod(t.shape) * np.dtype(t.dtype).itemsize
    header[t.name] = {'dtype': NAMES[np.dtype(t.dtype)], 'shape': list(t.shape),
                      'data_offsets': [offset, offset + n]}
    offset += n
  raw = json.dumps(header, separators=(',', ':')).encode()
  raw += b' ' * (-len(raw) % 8)                  # the data starts 8-byte aligned
  with open(path, 'wb') as f:
    f.write(struct.pack('<Q', len(raw)) + raw)
    for t in tensors:
      a = np.ascontiguousarray(t.produce(), dtype=t.dtype)
      if a.shape != tuple(t.shape):
        raise ValueError(f'{t.name}: produced shape {a.shape}, planned {tuple(t.shape)}')
      f.write(a.reshape(-1).view(np.uint8).data)
    f.flush()
    os.fsync(f.fileno())
