"""The embedded corpus: the Python standard library's own source files, as a TFDS dataset.

`StdlibPy` ('stdlib_py') is a tfds GeneratorBasedBuilder with one config per Python minor
version ('py311', ...), because the corpus differs between versions. Documents are the raw
bytes of every `*.py` under `sysconfig.get_paths()['stdlib']` (recursively, sorted by
relative POSIX path, anything under a `site-packages` folder skipped), split by
`hashing.split_of` (~5% validation). It is written as array_record and read with
`builder.as_data_source`, which needs no TensorFlow: the text is stored as a scalar bytes
Tensor (raw bytes, so the few files that are not UTF-8 survive unchanged) and the path as
Text, both of which tfds serialises with its own protobuf code.

The fingerprint ({'bytes', 'sha256', 'files'} over the sorted (path, bytes) pairs) and the
per-split counts go into the dataset's metadata.json, written by tfds together with the
dataset, so later runs report them without re-reading the files. Once the records read
back match that fingerprint, a digest manifest of the cache's files is written beside
them; every later use checks it (sizes and sha256) and rebuilds a damaged cache.
"""
from __future__ import annotations

import contextlib
import fcntl
import io
import os
import pathlib
import platform
import shutil
import sys
import sysconfig
import time

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils import tqdm_utils

from sparse_jax import digests
from sparse_jax.data import hashing

NAME = 'stdlib_py'
CONFIG = f'py{sys.version_info.major}{sys.version_info.minor}'
DATA_ENV = 'SPARSE_JAX_DATA'
DEFAULT_DATA_DIR = '~/.cache/sparse_jax'


def stdlib_root() -> pathlib.Path:
  return pathlib.Path(sysconfig.get_paths()['stdlib'])


def data_dir_for(data_dir: str | os.PathLike | None) -> pathlib.Path:
  """The argument, else $SPARSE_JAX_DATA, else ~/.cache/sparse_jax (user-expanded)."""
  chosen = data_dir or os.environ.get(DATA_ENV) or DEFAULT_DATA_DIR
  return pathlib.Path(chosen).expanduser()


def list_files(root: str | os.PathLike) -> list[tuple[str, pathlib.Path]]:
  """(relative POSIX path, path) of every *.py under root, sorted, site-packages skipped."""
  root = pathlib.Path(root)
  found = []
  for path in root.rglob('*.py'):
    rel = path.relative_to(root)
    if 'site-packages' in rel.parts or not path.is_file():
      continue
    found.append((rel.as_posix(), path))
  return sorted(found)


class StdlibPy(tfds.core.GeneratorBasedBuilder):
  """Python standard library sources, one document per *.py file (see module docstring).

  root: the directory to read instead of the running Python's stdlib (tests build a
  small fake one); it only matters while building.
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release: raw bytes of stdlib *.py files.'}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(
      name=CONFIG, description=f'Standard library of Python {sys.version_info[0]}.'
                               f'{sys.version_info[1]}.')]

  def __init__(self, *, root: str | os.PathLike | None = None, **kwargs):
    self._root = pathlib.Path(root) if root is not None else stdlib_root()
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description='Raw bytes of the Python standard library *.py source files.',
        features=tfds.features.FeaturesDict({
            'path': tfds.features.Text(),
            'text': tfds.features.Tensor(shape=(), dtype=np.object_),
        }),
        homepage='https://docs.python.org/3/library/',
        disable_shuffling=True,      # records stay in sorted-path order
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    files = list_files(self._root)
    if not files:
      raise ValueError(f'No *.py files under {self._root}; cannot build {NAME}.')
    counts = {s: {'files': 0, 'bytes': 0} for s in hashing.SPLITS}

    def read_all():
      for rel, path in files:
        content = path.read_bytes()
        split = counts[hashing.split_of(rel)]
        split['files'] += 1
        split['bytes'] += len(content)
        yield rel, content

    self.info.metadata.update(
        fingerprint=hashing.fingerprint(read_all()), splits=counts,
        root=str(self._root), python=platform.python_version())
    return {s: self._generate_examples([f for f in files if hashing.split_of(f[0]) == s])
            for s in hashing.SPLITS}

  def _generate_examples(self, files):
    for rel, path in files:
      yield rel, {'path': rel, 'text': path.read_bytes()}


@contextlib.contextmanager
def _quiet(verbose: bool):
  """Silences tfds' progress bars and prints unless verbose."""
  if verbose:
    yield
    return
  was_active = tqdm_utils._active  # pylint: disable=protected-access
  tfds.disable_progress_bar()
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    tqdm_utils.display_progress_bar(was_active)


@contextlib.contextmanager
def _file_lock(path: pathlib.Path):
  """Exclusive lock, so processes on one machine never build the same corpus twice."""
  with open(path, 'w') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def build(data_dir: str | os.PathLike | None = None, *, root: str | os.PathLike | None = None,
          verbose: bool = True) -> StdlibPy:
  """The prepared builder, verified, building it first when absent or damaged (idempotent;
  locked). ValueError (one line) when the data dir cannot be written."""
  data_dir = data_dir_for(data_dir)
  builder = StdlibPy(data_dir=os.fspath(data_dir), root=root, file_format='array_record')
  if builder.is_prepared() and _check(builder) is None:   # no lock: may be read-only
    return builder
  try:
    data_dir.mkdir(parents=True, exist_ok=True)
    with _file_lock(data_dir / f'.{NAME}.lock'):
      builder = StdlibPy(data_dir=os.fspath(data_dir), root=root, file_format='array_record')
      if builder.is_prepared():    # another process may have built it while we waited
        problem = _check(builder)
        if problem is None:
          return builder
        print(f'note: the {NAME} corpus cache at {builder.data_dir} {problem}; rebuilding '
              'it (it is derived data)', file=sys.stderr, flush=True)
        shutil.rmtree(builder.data_dir)
      start = time.perf_counter()
      with _quiet(verbose):
        builder.download_and_prepare()
      builder = StdlibPy(data_dir=os.fspath(data_dir), root=root)   # re-read from disk
      problem = _check(builder)    # reads every record back once, then records digests
      if problem is not None:
        raise ValueError(f'the {NAME} corpus just built at {builder.data_dir} {problem}')
  except OSError as e:
    raise ValueError(f'cannot build the {NAME} corpus in {data_dir}: {e.strerror}; point '
                     f'--config.data.data_dir (or ${DATA_ENV}) at a writable directory') from None
  if verbose:
    fp = builder.info.metadata['fingerprint']
    print(f'built {NAME}/{CONFIG} from {builder.info.metadata["root"]} in '
          f'{time.perf_counter() - start:.1f}s: {fp["files"]} files, {fp["bytes"]:,} '
          f'bytes, sha256 {fp["sha256"]}', flush=True)
  return builder


def _check(builder: StdlibPy) -> str | None:
  """What is wrong with a prepared cache, or None. With a digest manifest: its files'
  sizes and sha256. Without one (just built, or built by older code): every record is
  read back and fingerprinted against metadata.json, then the manifest is written (when
  the directory is writable; else this is repeated next time)."""
  path = pathlib.Path(builder.data_dir)
  if digests.has_manifest(path):
    return digests.check(path)
  try:
    records = sorted((r['path'].decode(), r['text']) for split in hashing.SPLITS
                     for r in builder.as_data_source(split=split))
    have = hashing.fingerprint(iter(records))
  except Exception as e:  # pylint: disable=broad-except  # riegeli, tfds, ...: unreadable
    return f'cannot be read ({type(e).__name__})'
  want = builder.info.metadata.get('fingerprint', {})
  if any(have[k] != want.get(k) for k in ('files', 'bytes', 'sha256')):
    return 'does not match its fingerprint'
  with contextlib.suppress(OSError):
    digests.write_manifest(path)
  return None


def describe(builder: StdlibPy) -> dict:
  """JSON-able description of a prepared corpus, read from its metadata.json."""
  meta = dict(builder.info.metadata)
  return {
      'dataset': f'{NAME}/{CONFIG}:{builder.version}',
      'path': os.fspath(builder.data_dir),
      'fingerprint': {**meta['fingerprint'], 'method': 'sha256 of the file contents'},
      'splits': meta['splits'],
      'root': meta['root'],
      'python': meta['python'],
  }
