"""Digest manifests: the size and sha256 of every file under a directory, recorded in
DIR/digests.json once the directory is complete, and checked before it is trusted.
Checkpoints and the corpus cache use them; neither orbax nor array_record checks the
bytes it reads back (a flipped bit restores silently)."""
from __future__ import annotations

import hashlib
import json
import os
import pathlib

MANIFEST = 'digests.json'


def digest_files(directory: pathlib.Path) -> dict[str, list]:
  """{relative POSIX path: [size, sha256]} of every file under `directory` but the
  manifest."""
  out = {}
  for p in sorted(pathlib.Path(directory).rglob('*')):
    if p.is_file() and p.name != MANIFEST:
      h = hashlib.sha256()
      with open(p, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
          h.update(chunk)
      out[p.relative_to(directory).as_posix()] = [p.stat().st_size, h.hexdigest()]
  return out


def write_manifest(directory: pathlib.Path) -> None:
  """Records the files as they are now; the manifest appears whole (rename) or not at all."""
  directory = pathlib.Path(directory)
  tmp = directory / (MANIFEST + '.tmp')
  tmp.write_text(json.dumps({'files': digest_files(directory)}))
  os.replace(tmp, directory / MANIFEST)


def has_manifest(directory: pathlib.Path) -> bool:
  return (pathlib.Path(directory) / MANIFEST).exists()


def check(directory: pathlib.Path) -> str | None:
  """None when the files under `directory` match its manifest; else what is wrong, in a
  few words ('lost its file X', 'fails the digest of X', ...). Files added after the
  manifest are not its concern."""
  directory = pathlib.Path(directory)
  try:
    want = json.loads((directory / MANIFEST).read_text())['files']
  except (ValueError, KeyError, OSError) as e:
    return f'has an unreadable {MANIFEST} ({type(e).__name__})'
  have = digest_files(directory)
  for rel, (size, digest) in want.items():
    if rel not in have:
      return f'lost its file {rel}'
    if have[rel][0] != size:
      return f'has {rel} at {have[rel][0]} bytes, not {size}'
    if have[rel][1] != digest:
      return f'fails the digest of {rel}'
  return None
