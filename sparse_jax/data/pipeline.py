"""The grain pipeline: documents -> byte tokens -> packed windows -> global batches -> this
process's rows.

Shapes: `B` global batch (windows), `b = B // process_count` rows per process, `L` seq_len.

  documents          random access (sources.open_split)
  shuffle            by index, a new order each epoch (grain's per-epoch seed is seed' + epoch,
                     with seed' a hash of `seed`, so seeds 0 and 1 do not share epoch orders)
  repeat             forever when repeat=True; one pass otherwise
  tokens             int32[n + 1]: the document's bytes, then EOD_TOKEN (0); or, with a
                     tokenizer.json, its token ids, then eod_id
  pack               one stream cut into windows int32[L + 1] (grain ConcatThenSplit); a
                     final partial window is dropped, never padded
  window shuffle     shuffle=True only: windows shuffled in blocks of `window_shuffle`, so a
                     batch mixes many documents instead of consecutive pieces of one
  batch              int32[B, L + 1], remainder dropped
  shard              rows [p*b, (p+1)*b): every process computes the same global batch, so a
                     run's data does not depend on how many processes share it
  split              {'inputs': window[:, :-1], 'targets': window[:, 1:]}, int32[b, L]
  prefetch           one thread, a few batches ahead (no worker processes: simple checkpoints)

Every stage is a grain dataset with get_state/set_state, so the iterator (and orbax's
grain.checkpoint.CheckpointSave/CheckpointRestore) resumes exactly where it stopped.
"""
from __future__ import annotations

import functools
import sys

import grain
import numpy as np

from sparse_jax.data import sources

VOCAB_SIZE = 256
EOD_TOKEN = 0           # never occurs in the stdlib sources (checked by the tests)
_KEY = 'tokens'


def _check(name: str, value, low: int, fix: str) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
    raise ValueError(f'{name}={value!r} must be an integer >= {low}; {fix}.')


def _mix_seed(seed: int) -> int:
  """A well-spread 32-bit seed derived from the user's seed (grain adds the epoch to it)."""
  return int(np.random.SeedSequence([int(seed), 0x5EED]).generate_state(1, np.uint32)[0])


def tokenize(doc) -> dict[str, np.ndarray]:
  """bytes | str -> {'tokens': int32[n + 1]}: the bytes, then EOD_TOKEN."""
  if isinstance(doc, np.ndarray):   # a scalar object array from some tfds features
    doc = doc.item()
  if isinstance(doc, str):
    doc = doc.encode('utf-8')
  out = np.empty(len(doc) + 1, np.int32)
  out[:-1] = np.frombuffer(doc, np.uint8)
  out[-1] = EOD_TOKEN
  return {_KEY: out}


def tokenizer_fn(path: str, eod_id: int):
  """Like tokenize, with the `tokenizers` library's reading of a tokenizer.json: the
  document's ids (no special tokens added), then eod_id."""
  from tokenizers import Tokenizer                 # imported only when a run names one
  tok = Tokenizer.from_file(str(path))

  def run(doc) -> dict[str, np.ndarray]:
    if isinstance(doc, np.ndarray):
      doc = doc.item()
    if isinstance(doc, bytes):
      doc = doc.decode('utf-8', errors='replace')
    ids = tok.encode(doc, add_special_tokens=False).ids
    return {_KEY: np.asarray(ids + [eod_id], np.int32)}
  return run


def _full_window(packed: dict) -> bool:
  """ConcatThenSplit pads only the last window; its padding has segment id 0."""
  return bool(packed[f'{_KEY}_segment_ids'].all())


def _window(packed: dict) -> np.ndarray:
  return packed[_KEY].astype(np.int32, copy=False)


def _local_rows(batch: np.ndarray, start: int, stop: int) -> dict[str, np.ndarray]:
  """int32[B, L + 1] -> this process's inputs/targets, int32[b, L] each."""
  rows = batch[start:stop]
  return {'inputs': np.ascontiguousarray(rows[:, :-1]),
          'targets': np.ascontiguousarray(rows[:, 1:])}


class _SlicesAsTuples(grain.IterDataset):
  """Passes elements through; on set_state turns the JSON lists in ConcatThenSplit's state
  back into tuples. Checkpoints store JSON, and ConcatThenSplit compares its
  'remainder_slices' with (-1, -1): as lists they would restore a phantom remainder."""

  def __iter__(self):
    return _SlicesAsTuplesIterator(self._parent.__iter__())


class _SlicesAsTuplesIterator(grain.DatasetIterator):

  def __next__(self):
    return next(self._parent)

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    slices = {k: tuple(v) for k, v in state['remainder_slices'].items()}
    self._parent.set_state({**state, 'remainder_slices': slices})


class _ThreadPrefetch(grain.experimental.ThreadPrefetchDatasetIterator):
  """grain's thread prefetch, minus a noisy traceback when an iterator still alive at
  interpreter exit is collected after its modules are torn down."""

  def __del__(self, _finalizing=sys.is_finalizing):
    if not _finalizing():
      self.close()


def make_iterator(source: str, split: str, *, seq_len: int, batch_size: int, seed: int,
                  shuffle: bool = True, repeat: bool = True, data_dir: str | None = None,
                  process_index: int = 0, process_count: int = 1,
                  window_shuffle: int = 1024, prefetch: int = 2,
                  tokenizer: str | None = None, eod_id: int = 0) -> grain.DatasetIterator:
  """A checkpointable iterator of {'inputs', 'targets'}: int32[b, seq_len] each.

  batch_size is GLOBAL; each process gets b = batch_size // process_count rows, rows
  [process_index*b, (process_index+1)*b) of the global batch. targets[:, i] is the token
  after inputs[:, i]. shuffle=False, repeat=False gives one pass in a fixed order (for
  evaluation). window_shuffle: windows per shuffle block (shuffle=True only); prefetch:
  batches a background thread keeps ready (0: none). tokenizer: a tokenizer.json whose
  ids replace the bytes, each document ending in eod_id (None: bytes).
  """
  _check('seq_len', seq_len, 1, 'it is the number of tokens per row')
  _check('batch_size', batch_size, 1, 'it is the global number of rows per batch')
  _check('process_count', process_count, 1, 'use 1 for a single process')
  _check('seed', seed, 0, 'use a non-negative integer seed')
  _check('window_shuffle', window_shuffle, 1, 'use 1 to keep windows in stream order')
  _check('prefetch', prefetch, 0, 'use 0 to turn prefetching off')
  _check('process_index', process_index, 0, f'use 0..{process_count - 1}')
  if process_index >= process_count:
    raise ValueError(f'process_index={process_index} must be < process_count='
                     f'{process_count}; use 0..{process_count - 1}.')
  if batch_size % process_count:
    raise ValueError(f'batch_size={batch_size} (global) is not divisible by process_count='
                     f'{process_count}; use a multiple of {process_count}.')
  docs, key = sources.open_split(source, split, data_dir)
  if len(docs) == 0:
    raise ValueError(f'Split {split!r} of data source {source!r} has no documents.')
  mixed = _mix_seed(seed)

  ds = grain.MapDataset.source(docs)
  if key is not None:
    ds = ds.map(lambda example: example[key])
  if shuffle:
    ds = ds.shuffle(seed=mixed)
  if repeat:
    ds = ds.repeat()
  ds = ds.map(tokenize if tokenizer is None else tokenizer_fn(tokenizer, eod_id)).to_iter_dataset(
      grain.ReadOptions(num_threads=2, prefetch_buffer_size=8))
  ds = grain.experimental.ConcatThenSplitIterDataset(ds, length_struct={_KEY: seq_len + 1})
  ds = _SlicesAsTuples(ds)
  ds = ds.filter(_full_window).map(_window)
  if shuffle and window_shuffle > 1:
    # grain seeds block i with seed + i: below 2**31 that stays a valid 32-bit seed.
    ds = grain.experimental.WindowShuffleIterDataset(
        ds, window_size=window_shuffle, seed=(mixed ^ 0x9E3779B9) % 2**31)
  ds = ds.batch(batch_size, drop_remainder=True)
  rows = batch_size // process_count
  ds = ds.map(functools.partial(_local_rows, start=process_index * rows,
                                stop=(process_index + 1) * rows))
  if prefetch:
    return _ThreadPrefetch(iter(ds), prefetch)
  return iter(ds)
