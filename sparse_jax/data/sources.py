"""Where documents come from: the `source` string -> a random-access sequence of documents.

Source forms:
  'stdlib'                                  the embedded corpus (corpus.py), built on first use
  'tfds:NAME[/CONFIG][:VERSION][:FEATURE]'  a prepared TFDS dataset by name, e.g. 'tfds:lm1b',
                                            'tfds:c4/en', 'tfds:c4/en:3.1.0:text'; FEATURE
                                            defaults to 'text'
  'files:GLOB[,GLOB...]'                    plain text files, one document per file

A document is bytes (or str, encoded as UTF-8 later). Every source is read through random
access (an array_record data source or a list of files), which is what lets grain shuffle
by index and checkpoint a position as a few integers.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import importlib
import os
import pathlib
import re
from typing import Sequence

import tensorflow_datasets as tfds
from tensorflow_datasets.core import constants as tfds_constants

from sparse_jax.data import corpus, hashing

FORMS = ("'stdlib', 'tfds:NAME[/CONFIG][:VERSION][:FEATURE]' (e.g. 'tfds:lm1b', "
         "'tfds:c4/en'), or 'files:GLOB[,GLOB...]'")
_VERSION = re.compile(r'^\d+(\.(\d+|\*)){0,2}$')
_HASH_CONTENTS_UP_TO = 64 << 20   # files sources: hash contents up to 64 MiB, else names+sizes


class DatasetNotPreparedError(ValueError):
  """A TFDS dataset is not on disk (or not in a random-access format); one-line message."""


@dataclasses.dataclass(frozen=True)
class Source:
  kind: str                          # 'stdlib' | 'tfds' | 'files'
  name: str = ''                     # tfds: NAME[/CONFIG][:VERSION]
  feature: str = 'text'              # tfds: the text feature
  globs: tuple[str, ...] = ()        # files


def parse(source: str) -> Source:
  """Parses a source string; ValueError naming it and the valid forms."""
  kind, _, rest = str(source).partition(':')
  if source == 'stdlib':
    return Source('stdlib')
  if kind == 'tfds' and rest:
    parts = rest.split(':')
    name, extra = parts[0], parts[1:]
    feature = 'text'
    if extra and not _VERSION.match(extra[-1]):
      feature = extra.pop()
    if name and len(extra) <= 1 and all(_VERSION.match(v) for v in extra) and feature:
      return Source('tfds', name=':'.join([name] + extra), feature=feature)
  if kind == 'files':
    globs = tuple(g.strip() for g in rest.split(',') if g.strip())
    if globs:
      return Source('files', globs=globs)
  raise ValueError(f'Unknown data source {source!r}; use {FORMS}.')


# --- tfds by name ------------------------------------------------------------------------


def _tfds_dir(data_dir) -> str:
  """The argument, else tfds' own default ($TFDS_DATA_DIR or ~/tensorflow_datasets)."""
  if not data_dir:
    return tfds_constants.DATA_DIR
  return os.fspath(pathlib.Path(data_dir).expanduser())


def _not_prepared(name: str, data_dir: str, why: str) -> DatasetNotPreparedError:
  return DatasetNotPreparedError(
      f'tfds:{name} {why} under {data_dir}. Prepare it on a machine with network: '
      f'`tfds build {name} --file_format=array_record --data_dir={data_dir}` (grain needs '
      f'array_record), then copy that directory here, or point --config.data.data_dir '
      f'(data_dir=) at a prepared copy.')


def tfds_builder(name: str, data_dir=None) -> tfds.core.DatasetBuilder:
  """A prepared tfds builder; DatasetNotPreparedError (one line) when it is not on disk."""
  data_dir = _tfds_dir(data_dir)
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    # tfds imports its legacy builder packages in one loop that stops at the first
    # ImportError ('nearest_neighbors' needs h5py), so 'text' (c4, wikipedia, ...) can stay
    # unregistered. Importing it directly works, and needs no TensorFlow.
    importlib.import_module('tensorflow_datasets.text')
    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
      raise DatasetNotPreparedError(
          f'tfds:{name} is not a dataset this tensorflow_datasets ({tfds.__version__}) knows, '
          f'and nothing is prepared under that name in {data_dir}; check the spelling '
          '(python -c "import tensorflow_datasets as tfds; print(tfds.list_builders())"), or '
          'point --config.data.data_dir at the directory that holds it') from None
  if not builder.is_prepared():
    raise _not_prepared(name, data_dir, 'is not prepared')
  return builder


def _tfds_split(builder, source: str, split: str, feature: str):
  """builder.as_data_source(split), with one-line errors that name `source`."""
  if feature not in builder.info.features:
    raise ValueError(f'{source} has no feature {feature!r}; its features are '
                     f'{sorted(builder.info.features)} (choose one with tfds:NAME:FEATURE).')
  try:
    return builder.as_data_source(split=split)
  except NotImplementedError:   # prepared as tfrecord: no random access
    raise _not_prepared(builder.info.full_name.rsplit('/', 1)[0], builder.data_dir_root,
                        f'is stored as {builder.info.file_format.value}, not array_record'
                        ) from None
  except (KeyError, ValueError) as e:
    raise ValueError(f'{source} has no split {split!r} (splits: '
                     f'{sorted(builder.info.splits)}): {str(e).splitlines()[0]}') from None


def _tfds_fingerprint(builder) -> dict:
  """Names and sizes of the prepared files: cheap for big datasets, and honest about it."""
  files = sorted(p for p in pathlib.Path(builder.data_dir).iterdir() if p.is_file())
  h = hashlib.sha256()
  for p in files:
    h.update(f'{p.name}\0{p.stat().st_size}\0'.encode())
  return {'bytes': sum(p.stat().st_size for p in files), 'sha256': h.hexdigest(),
          'files': len(files), 'method': 'sha256 of the prepared file names and sizes'}


# --- text files ---------------------------------------------------------------------------


class TextFiles(Sequence):
  """Random-access documents: the bytes of each file, read on access."""

  def __init__(self, paths: Sequence[str]):
    self.paths = list(paths)

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, i: int) -> bytes:
    return pathlib.Path(self.paths[i]).read_bytes()


def list_text_files(globs: Sequence[str]) -> list[tuple[str, str]]:
  """(relative POSIX path, path) of the files matching any glob, sorted; relative to their
  common folder, so the split does not depend on where the tree sits."""
  paths = sorted({os.path.abspath(p) for g in globs
                  for p in glob.glob(os.path.expanduser(g), recursive=True) if os.path.isfile(p)})
  if not paths:
    raise ValueError(f'files:{",".join(globs)} matches no files; give a glob (or comma-'
                     f'separated globs) of plain text files, e.g. files:data/*.txt.')
  common = os.path.commonpath([os.path.dirname(p) for p in paths])
  return [(pathlib.Path(os.path.relpath(p, common)).as_posix(), p) for p in paths]


def _files_split(files, split: str) -> TextFiles:
  if split == 'all':
    return TextFiles([p for _, p in files])
  if split not in hashing.SPLITS:
    raise ValueError(f"files sources have splits 'train', 'validation' (~5% of the files, "
                     f"by path hash) and 'all'; got split={split!r}.")
  chosen = [p for rel, p in files if hashing.split_of(rel) == split]
  if not chosen:
    raise ValueError(f'files source: none of its {len(files)} files falls in the {split!r} '
                     'split (a hash of each path puts ~1 file in 20 in validation); give '
                     'more files, e.g. cut a large one into 20 or more.')
  return TextFiles(chosen)


def _files_fingerprint(files) -> dict:
  sizes = [os.path.getsize(p) for _, p in files]
  if sum(sizes) <= _HASH_CONTENTS_UP_TO:
    fp = hashing.fingerprint((rel, pathlib.Path(p).read_bytes()) for rel, p in files)
    return {**fp, 'method': 'sha256 of the file contents'}
  fp = hashing.fingerprint((rel, str(n).encode()) for (rel, _), n in zip(files, sizes))
  return {**fp, 'bytes': sum(sizes), 'method': 'sha256 of the file names and sizes'}


# --- the two entry points -----------------------------------------------------------------


def open_split(source: str, split: str, data_dir=None) -> tuple[Sequence, str | None]:
  """(random-access documents, feature key or None) for one split of a source."""
  src = parse(source)
  if src.kind == 'stdlib':
    builder = corpus.build(data_dir, verbose=True)
    return _tfds_split(builder, source, split, 'text'), 'text'
  if src.kind == 'tfds':
    builder = tfds_builder(src.name, data_dir)
    return _tfds_split(builder, source, split, src.feature), src.feature
  return _files_split(list_text_files(src.globs), split), None


def prepare(source: str, data_dir: str | None = None, verbose: bool = True) -> dict:
  """Makes the source ready (builds the embedded corpus once) and describes it.

  Returns a JSON-able dict with at least 'source', 'data_dir', 'fingerprint'
  ({'bytes', 'sha256', 'files', 'method'}) and 'splits'. Idempotent: the corpus is built
  only when absent, and its fingerprint is read back from its metadata.json.
  """
  src = parse(source)
  if src.kind == 'stdlib':
    data_dir = corpus.data_dir_for(data_dir)
    info = {'source': source, 'data_dir': os.fspath(data_dir),
            **corpus.describe(corpus.build(data_dir, verbose=verbose))}
  elif src.kind == 'tfds':
    builder = tfds_builder(src.name, data_dir)
    if src.feature not in builder.info.features:
      _tfds_split(builder, source, 'unused', src.feature)    # raises, naming the features
    info = {'source': source, 'data_dir': os.fspath(builder.data_dir_root),
            'dataset': f'{builder.info.full_name}', 'path': os.fspath(builder.data_dir),
            'feature': src.feature, 'fingerprint': _tfds_fingerprint(builder),
            'splits': {k: {'documents': v.num_examples, 'bytes': v.num_bytes}
                       for k, v in builder.info.splits.items()}}
  else:
    files = list_text_files(src.globs)
    counts = {s: {'files': 0, 'bytes': 0} for s in hashing.SPLITS}
    for rel, p in files:
      c = counts[hashing.split_of(rel)]
      c['files'] += 1
      c['bytes'] += os.path.getsize(p)
    info = {'source': source, 'data_dir': None, 'fingerprint': _files_fingerprint(files),
            'splits': counts}
  info.update(vocab_size=256, eod_token=0)
  if verbose:
    fp = info['fingerprint']
    print(f"data {source}: {fp['files']} files, {fp['bytes']:,} bytes, sha256 "
          f"{fp['sha256'][:16]}... ({fp['method']}); splits "
          + ', '.join(f'{k} {v.get("files", v.get("documents"))}'
                      for k, v in info['splits'].items()), flush=True)
  return info
