"""Deterministic hashes over documents: the train/validation split rule and fingerprints.

Both depend only on relative paths and bytes, never on the machine, the time or a seed,
so every run (and every process of a multi-process run) sees the same split.
"""
from __future__ import annotations

import hashlib
from typing import Iterable

VALIDATION_PER_10K = 500   # ~5% of the documents go to 'validation'
SPLITS = ('train', 'validation')


def split_of(relpath: str) -> str:
  """'train' or 'validation' for a document, from sha256 of its relative POSIX path."""
  h = int.from_bytes(hashlib.sha256(relpath.encode('utf-8')).digest()[:8], 'big')
  return 'validation' if h % 10_000 < VALIDATION_PER_10K else 'train'


def fingerprint(documents: Iterable[tuple[str, bytes]]) -> dict:
  """{'bytes', 'sha256', 'files'} over (relative path, content) pairs in the given order.

  Each pair enters the hash as `path NUL len NUL content`, so no two different
  sequences of pairs can hash the same bytes.
  """
  h = hashlib.sha256()
  total = count = 0
  for path, content in documents:
    h.update(f'{path}\0{len(content)}\0'.encode('utf-8'))
    h.update(content)
    total += len(content)
    count += 1
  return {'bytes': total, 'sha256': h.hexdigest(), 'files': count}
