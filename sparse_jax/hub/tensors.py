"""Where a model parameter lives in a Hugging Face folder, and how its layout differs.

A Source names the folder's tensors behind one parameter of sparse_jax.models.TransformerLM
and converts between the two layouts: torch's Linear stores [out, in], the model
[in, out]; experts are one tensor per expert on disk (transformers' default when it
saves) or fused [E, ...] tensors (as transformers 5 holds them in memory). Reading takes
the model's index (the part of the parameter one device holds) and reads only that part.
Shapes are given in the folder's layout so that an error can name what the file holds.
`entries` map tensor names to objects with .read(index) (safetensors.Entry, or
loading.Fp8Entry, which dequantises).
"""
from __future__ import annotations

import dataclasses

import numpy as np



def _ranges(index: tuple, shape: tuple) -> tuple[slice, ...]:
  """A device's index (slices, possibly open) as closed slices over `shape`."""
  index = tuple(index) + (slice(None),) * (len(shape) - len(index))
  return tuple(slice(*s.indices(n)) for s, n in zip(index, shape))


@dataclasses.dataclass(frozen=True)
class Same:
  """A tensor stored as the model holds it (embeddings, norm scales, biases)."""
  name: str

  def expected(self, shape: tuple) -> dict[str, tuple]:
    return {self.name: tuple(shape)}

  def read(self, entries, index, shape) -> np.ndarray:
    return entries[self.name].read(_ranges(index, shape))

  def export(self, value: np.ndarray) -> dict[str, np.ndarray]:
    return {self.name: value}


@dataclasses.dataclass(frozen=True)
class Linear:
  """A torch Linear weight [out, in] behind a kernel [in, out]."""
  name: str

  def expected(self, shape: tuple) -> dict[str, tuple]:
    return {self.name: tuple(shape[::-1])}

  def read(self, entries, index, shape) -> np.ndarray:
    i, o = _ranges(index, shape)
    return entries[self.name].read((o, i)).T

  def export(self, value: np.ndarray) -> dict[str, np.ndarray]:
    return {self.name: value.T}


@dataclasses.dataclass(frozen=True)
class PerExpert:
  """One Linear weight [out, in] per expert behind a stacked kernel [E, in, out]."""
  names: tuple[str, ...]

  def expected(self, shape: tuple) -> dict[str, tuple]:
    if shape[0] != len(self.names):
      raise ValueError(f'{len(self.names)} expert tensors for {shape[0]} experts')
    return {n: (shape[2], shape[1]) for n in self.names}

  def read(self, entries, index, shape) -> np.ndarray:
    e, i, o = _ranges(index, shape)
    return np.stack([entries[n].read((o, i)).T for n in self.names[e]])

  def export(self, value: np.ndarray) -> dict[str, np.ndarray]:
    return {n: value[j].T for j, n in enumerate(self.names)}


@dataclasses.dataclass(frozen=True)
class Fused:
  """Part `part` of `parts` stacked along the rows of a fused [E, parts * out, in] tensor
  (transformers 5's gate_up_proj holds gate then up; down_proj is one part)."""
  name: str
  part: int = 0
  parts: int = 1

  def expected(self, shape: tuple) -> dict[str, tuple]:
    return {self.name: (shape[0], self.parts * shape[2], shape[1])}

  def read(self, entries, index, shape) -> np.ndarray:
    e, i, o = _ranges(index, shape)
    rows = slice(self.part * shape[2] + o.start, self.part * shape[2] + o.stop)
    return entries[self.name].read((e, rows, i)).transpose(0, 2, 1)

  def export(self, value: np.ndarray) -> dict[str, np.ndarray]:
    raise NotImplementedError('exports write one tensor per expert')
