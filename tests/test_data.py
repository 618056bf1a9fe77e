"""Data: the embedded stdlib corpus (TFDS, no TensorFlow), tfds-by-name and files sources,
and the grain pipeline (packing, shuffling, checkpoints, process sharding)."""
import json
import pathlib
import sys
import time

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

from sparse_jax import data
from sparse_jax.data import corpus, hashing


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_same_batches(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    assert x.keys() == y.keys() == {'inputs', 'targets'}
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def stream_of(batches):
  """The token stream the windows were cut from: each row is inputs + last target."""
  rows = [np.concatenate([b['inputs'], b['targets'][:, -1:]], axis=1) for b in batches]
  return np.concatenate(rows).reshape(-1)


def tokens_of(docs):
  return np.concatenate([data.tokenize(d)['tokens'] for d in docs])


@pytest.fixture(scope='session')
def stdlib_dir(tmp_path_factory):
  """The real stdlib corpus, built once per session (~1 s on 2 cores)."""
  d = tmp_path_factory.mktemp('stdlib_data')
  start = time.perf_counter()
  info = data.prepare('stdlib', data_dir=str(d), verbose=False)
  print(f'\nstdlib corpus built in {time.perf_counter() - start:.2f}s: {info["fingerprint"]}')
  return str(d)


@pytest.fixture
def text_files(tmp_path):
  """60 small documents doc00.txt..doc59.txt, doc i being 'doc i: ' and i+1 letters."""
  folder = tmp_path / 'texts'
  folder.mkdir()
  docs = []
  for i in range(60):
    doc = f'doc {i}: ' + 'abcdefghij'[i % 10] * (i + 1) + '\n'
    (folder / f'doc{i:02d}.txt').write_text(doc)
    docs.append(doc.encode())
  return folder, docs


# --- sources ------------------------------------------------------------------------------


def test_parse_sources():
  assert data.sources.parse('stdlib').kind == 'stdlib'
  assert data.sources.parse('tfds:lm1b') == data.sources.Source('tfds', 'lm1b', 'text')
  assert data.sources.parse('tfds:c4/en:3.1.0') == data.sources.Source('tfds', 'c4/en:3.1.0')
  assert data.sources.parse('tfds:wiki:title').feature == 'title'
  assert data.sources.parse('files:a/*.txt, b/**/*.md').globs == ('a/*.txt', 'b/**/*.md')
  for bad in ('', 'lm1b', 'tfds:', 'files:', 'tfds:a:b:c', 'stdlib:x'):
    with pytest.raises(ValueError, match=r"Unknown data source .*'stdlib'.*tfds:NAME.*files:GLOB"):
      data.prepare(bad, verbose=False)


def test_split_rule_is_fixed():
  # Pure function of the relative path: these hold on every machine and Python version.
  assert hashing.split_of('asyncio/futures.py') == 'validation'
  assert hashing.split_of('os.py') == 'train'
  assert [i for i in range(60) if hashing.split_of(f'doc{i:02d}.txt') == 'validation'] == [
      40, 44, 50]


# --- the embedded corpus ------------------------------------------------------------------


def test_stdlib_corpus_matches_the_files_and_splits_disjointly(stdlib_dir):
  info = data.prepare('stdlib', data_dir=stdlib_dir, verbose=False)
  builder = corpus.build(stdlib_dir, verbose=False)
  records = {s: builder.as_data_source(split=s) for s in hashing.SPLITS}
  paths = {s: [r['path'].decode() for r in src] for s, src in records.items()}
  assert not set(paths['train']) & set(paths['validation'])
  for split, ps in paths.items():
    assert ps == sorted(ps) and all(hashing.split_of(p) == split for p in ps)
  on_disk = corpus.list_files(corpus.stdlib_root())
  assert sorted(paths['train'] + paths['validation']) == [rel for rel, _ in on_disk]
  assert not any('site-packages' in p for p in paths['train'])
  n_val = len(paths['validation']) / len(on_disk)
  assert 0.02 < n_val < 0.10
  # The stored bytes are the files' bytes: the fingerprint recomputed from the records
  # equals the one taken from the files at build time. EOD (byte 0) never occurs.
  stored = sorted((r['path'].decode(), r['text']) for src in records.values() for r in src)
  assert not any(b'\0' in text for _, text in stored)
  fp = {**hashing.fingerprint(stored), 'method': 'sha256 of the file contents'}
  assert info['fingerprint'] == fp
  assert fp['files'] == len(on_disk)
  assert fp['bytes'] == sum(p.stat().st_size for _, p in on_disk)
  assert info['splits']['validation']['files'] == len(paths['validation'])
  assert info['source'] == 'stdlib' and info['data_dir'] == stdlib_dir
  assert info['python'] and json.loads(json.dumps(info)) == info
  assert 'tensorflow' not in sys.modules


def test_prepare_is_idempotent(stdlib_dir, capsys):
  version_dir = pathlib.Path(corpus.build(stdlib_dir, verbose=False).data_dir)
  before = {p.name: p.stat().st_mtime_ns for p in version_dir.iterdir()}
  first = data.prepare('stdlib', data_dir=stdlib_dir, verbose=False)
  second = data.prepare('stdlib', data_dir=stdlib_dir, verbose=True)
  assert first == second
  assert {p.name: p.stat().st_mtime_ns for p in version_dir.iterdir()} == before
  out = capsys.readouterr().out
  assert first['fingerprint']['sha256'][:16] in out and 'Generating' not in out


def test_data_dir_defaults_to_env(tmp_path, monkeypatch):
  monkeypatch.setenv('SPARSE_JAX_DATA', str(tmp_path / 'env'))
  assert corpus.data_dir_for(None) == tmp_path / 'env'
  assert corpus.data_dir_for(str(tmp_path / 'arg')) == tmp_path / 'arg'
  monkeypatch.delenv('SPARSE_JAX_DATA')
  assert corpus.data_dir_for(None) == pathlib.Path('~/.cache/sparse_jax').expanduser()


def test_fingerprint_stable_across_builds(tmp_path):
  root = tmp_path / 'fake_stdlib'
  files = {'os.py': b'import sys\n', 'asyncio/futures.py': b'# futures\n',
           'json/__init__.py': 'x = "\u00e9"\n'.encode('latin-1'),   # not UTF-8: kept raw
           'site-packages/pkg.py': b'skipped\n', 'notes.txt': b'not python\n'}
  for rel, content in files.items():
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(content)
  infos = [corpus.describe(corpus.build(tmp_path / f'build{i}', root=root, verbose=False))
           for i in range(2)]
  assert infos[0]['fingerprint'] == infos[1]['fingerprint']
  kept = sorted((r, c) for r, c in files.items() if r.endswith('.py') and 'site-' not in r)
  assert infos[0]['fingerprint']['sha256'] == hashing.fingerprint(kept)['sha256']
  assert infos[0]['splits'] == {'train': {'files': 2, 'bytes': 11 + 8},
                                'validation': {'files': 1, 'bytes': 10}}
  # The pipeline reads it back byte for byte, documents in sorted-path order.
  it = data.make_iterator('stdlib', 'train', seq_len=4, batch_size=1, seed=0, shuffle=False,
                          repeat=False, data_dir=str(tmp_path / 'build0'))
  got = stream_of(list(it))
  want = tokens_of([files['json/__init__.py'], files['os.py']])
  np.testing.assert_array_equal(got, want[:len(got)])
  assert len(got) == len(want) // 5 * 5
  # One changed byte changes the fingerprint.
  (root / 'os.py').write_bytes(b'import sys\r')
  changed = corpus.describe(corpus.build(tmp_path / 'build2', root=root, verbose=False))
  assert changed['fingerprint']['sha256'] != infos[0]['fingerprint']['sha256']
  assert changed['fingerprint']['bytes'] == infos[0]['fingerprint']['bytes']


# --- the pipeline -------------------------------------------------------------------------


def test_windows_are_shifted_byte_tokens(stdlib_dir):
  it = data.make_iterator('stdlib', 'train', seq_len=32, batch_size=8, seed=0,
                          data_dir=stdlib_dir)
  for batch in take(it, 5):
    assert batch['inputs'].shape == batch['targets'].shape == (8, 32)
    assert batch['inputs'].dtype == batch['targets'].dtype == np.int32
    np.testing.assert_array_equal(batch['inputs'][:, 1:], batch['targets'][:, :-1])
    assert batch['inputs'].min() >= 0 and batch['inputs'].max() < data.VOCAB_SIZE


def test_packing_concatenates_documents_with_eod(text_files):
  folder, docs = text_files
  it = data.make_iterator(f'files:{folder}/*.txt', 'all', seq_len=7, batch_size=3, seed=0,
                          shuffle=False, repeat=False)
  batches = list(it)
  want = tokens_of(docs)                       # documents in sorted order, each then EOD
  n = len(want) // 8 // 3 * 3                  # whole windows, whole batches
  assert len(batches) == n // 3
  np.testing.assert_array_equal(stream_of(batches), want[:n * 8])
  assert (want == data.EOD_TOKEN).sum() == len(docs)


def test_seeds_and_epochs(text_files):
  folder, docs = text_files
  # Documents of exactly seq_len bytes + EOD: every window is one whole document.
  for i in range(20):
    (folder / f'doc{i:02d}.txt').write_bytes(b'%02d' % i + b'x' * 6)
  for i in range(20, 60):
    (folder / f'doc{i:02d}.txt').unlink()

  def docs_seen(seed, n, shuffle=True):
    it = data.make_iterator(f'files:{folder}/*', 'all', seq_len=8, batch_size=1, seed=seed,
                            shuffle=shuffle, window_shuffle=1)
    return [int(bytes(b['inputs'][0, :2].astype(np.uint8))) for b in take(it, n)]

  a = docs_seen(0, 40)
  assert a == docs_seen(0, 40)                                # same seed, same order
  assert a != docs_seen(1, 40)                                # another seed, another order
  assert sorted(a[:20]) == sorted(a[20:]) == list(range(20))  # each epoch once each...
  assert a[:20] != a[20:]                                     # ...in a new order
  assert docs_seen(0, 40, shuffle=False) == list(range(20)) * 2
  assert docs_seen(5, 40, shuffle=False) == list(range(20)) * 2


def test_same_seed_same_batches(stdlib_dir):
  def make(seed):
    return data.make_iterator('stdlib', 'train', seq_len=16, batch_size=4, seed=seed,
                              data_dir=stdlib_dir)
  a = take(make(3), 4)
  assert_same_batches(a, take(make(3), 4))
  assert not np.array_equal(a[0]['inputs'], take(make(4), 1)[0]['inputs'])


def test_repeat_false_is_one_finite_pass(stdlib_dir):
  def make(**kw):
    return data.make_iterator('stdlib', 'validation', seq_len=512, batch_size=16, seed=0,
                              data_dir=stdlib_dir, repeat=False, **kw)
  ordered = list(make(shuffle=False))
  total = data.prepare('stdlib', stdlib_dir, verbose=False)['splits']['validation']
  tokens = total['bytes'] + total['files']                   # bytes plus one EOD each
  assert len(ordered) == tokens // 513 // 16
  assert_same_batches(ordered, list(make(shuffle=False)))    # a fixed order
  assert len(list(make(shuffle=True))) == len(ordered)       # shuffled: same size


@pytest.mark.parametrize('prefetch', [0, 2])
def test_get_state_set_state_resumes_exactly(stdlib_dir, prefetch):
  def make():
    return data.make_iterator('stdlib', 'train', seq_len=64, batch_size=8, seed=1,
                              data_dir=stdlib_dir, window_shuffle=64, prefetch=prefetch)
  it = make()
  for steps in (0, 3, 8):       # at the start, inside the first block, after it
    take(it, steps)
    state = json.loads(json.dumps(it.get_state()))    # JSON, as orbax stores it
    expected = take(it, 5)
    restored = make()
    restored.set_state(state)
    assert_same_batches(take(restored, 5), expected)


def test_orbax_checkpoint_round_trip(stdlib_dir, tmp_path):
  def make():
    return data.make_iterator('stdlib', 'train', seq_len=32, batch_size=4, seed=2,
                              data_dir=stdlib_dir)
  it = make()
  take(it, 7)
  with ocp.CheckpointManager(tmp_path / 'ckpt') as mngr:
    mngr.save(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  expected = take(it, 4)
  restored = make()
  take(restored, 2)                                 # a used iterator is overwritten too
  with ocp.CheckpointManager(tmp_path / 'ckpt') as mngr:
    assert mngr.latest_step() == 7
    mngr.restore(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  assert_same_batches(take(restored, 4), expected)


def test_eval_iterator_resumes_mid_pass(text_files):
  folder, _ = text_files
  def make():
    return data.make_iterator(f'files:{folder}/*.txt', 'all', seq_len=5, batch_size=2,
                              seed=0, shuffle=False, repeat=False)
  full = list(make())
  it = make()
  take(it, 9)
  restored = make()
  restored.set_state(it.get_state())
  assert_same_batches(list(restored), full[9:])


def test_processes_split_the_global_batch(stdlib_dir):
  def make(index, count):
    return data.make_iterator('stdlib', 'train', seq_len=16, batch_size=6, seed=0,
                              data_dir=stdlib_dir, process_index=index, process_count=count)
  whole = take(make(0, 1), 3)
  parts = [take(make(p, 2), 3) for p in range(2)]
  thirds = [take(make(p, 3), 3) for p in range(3)]
  for step, batch in enumerate(whole):
    for split in (parts, thirds):
      for key in ('inputs', 'targets'):
        np.testing.assert_array_equal(
            np.concatenate([p[step][key] for p in split]), batch[key])
    assert parts[0][step]['inputs'].shape == (3, 16)


@pytest.mark.parametrize('kwargs, match', [
    (dict(batch_size=0), r'batch_size=0 must be an integer >= 1'),
    (dict(seq_len=0), r'seq_len=0 must be an integer >= 1'),
    (dict(seq_len=2.5), r'seq_len=2.5 must be an integer'),
    (dict(seed=-1), r'seed=-1 must be .*non-negative'),
    (dict(batch_size=5, process_count=2), r'batch_size=5 .* not divisible by process_count=2'),
    (dict(process_index=2, process_count=2), r'process_index=2 must be < process_count=2'),
    (dict(process_count=0), r'process_count=0 must be an integer >= 1'),
])
def test_bad_arguments_are_named(kwargs, match):
  args = dict(seq_len=8, batch_size=4, seed=0) | kwargs
  with pytest.raises(ValueError, match=match):
    data.make_iterator('stdlib', 'train', **args)


# --- files and tfds-by-name sources -------------------------------------------------------


def test_files_source(text_files, tmp_path):
  folder, docs = text_files
  (folder / 'extra.md').write_text('markdown\n')
  src = f'files:{folder}/doc0*.txt,{folder}/*.md'
  info = data.prepare(src, verbose=False)
  assert info['fingerprint']['files'] == 11 and info['data_dir'] is None
  assert info['fingerprint']['method'] == 'sha256 of the file contents'
  assert json.loads(json.dumps(info)) == info
  got = stream_of(list(data.make_iterator(src, 'all', seq_len=3, batch_size=1, seed=0,
                                          shuffle=False, repeat=False)))
  want = tokens_of(docs[:10] + [b'markdown\n'])
  np.testing.assert_array_equal(got, want[:len(got)])
  # Hash split over paths relative to the files' common folder: docs 40, 44, 50 validate.
  val = data.make_iterator(f'files:{folder}/*.txt', 'validation', seq_len=4, batch_size=1,
                           seed=0, shuffle=False, repeat=False)
  got = stream_of(list(val))
  want = tokens_of([docs[40], docs[44], docs[50]])
  np.testing.assert_array_equal(got, want[:len(got)])
  with pytest.raises(ValueError, match='matches no files'):
    data.make_iterator(f'files:{tmp_path}/nothing/*.txt', 'train', seq_len=4, batch_size=1,
                       seed=0)
  with pytest.raises(ValueError, match=r"split='test'"):
    data.make_iterator(src, 'test', seq_len=4, batch_size=1, seed=0)


class SparseJaxTestLines(tfds.core.GeneratorBasedBuilder):
  """A tiny text dataset standing in for lm1b & co. (registered as 'sparse_jax_test_lines')."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, disable_shuffling=True,
        features=tfds.features.FeaturesDict({'text': tfds.features.Text(),
                                             'title': tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(range(40)),
            'test': self._generate_examples(range(40, 45))}

  def _generate_examples(self, ids):
    for i in ids:
      yield i, {'text': LINES[i], 'title': f'line {i}'}


LINES = [f'sentence number {i} says {"hello " * (i % 4)}world.' for i in range(45)]


def test_tfds_by_name(tmp_path):
  SparseJaxTestLines(data_dir=tmp_path, file_format='array_record').download_and_prepare()
  source = 'tfds:sparse_jax_test_lines'
  info = data.prepare(source, data_dir=str(tmp_path), verbose=False)
  assert info['splits']['train']['documents'] == 40 and info['feature'] == 'text'
  assert info['fingerprint']['files'] >= 3 and len(info['fingerprint']['sha256']) == 64
  assert info['data_dir'] == str(tmp_path) and json.loads(json.dumps(info)) == info

  def stream(src, split):
    it = data.make_iterator(src, split, seq_len=9, batch_size=2, seed=0, shuffle=False,
                            repeat=False, data_dir=str(tmp_path))
    return stream_of(list(it))

  got = stream(source, 'test')
  want = tokens_of(LINES[40:])
  np.testing.assert_array_equal(got, want[:len(got)])
  got = stream(f'{source}:1.0.0:title', 'train')
  want = tokens_of([f'line {i}' for i in range(40)])
  np.testing.assert_array_equal(got, want[:len(got)])
  shuffled = data.make_iterator(source, 'train', seq_len=9, batch_size=2, seed=0,
                                data_dir=str(tmp_path))
  assert take(shuffled, 1)[0]['inputs'].shape == (2, 9)
  with pytest.raises(ValueError, match=r"no feature 'body'.*\['text', 'title'\]"):
    data.prepare(f'{source}:body', data_dir=str(tmp_path), verbose=False)
  with pytest.raises(ValueError, match=r"no split 'validation'.*\['test', 'train'\]"):
    stream(source, 'validation')
  assert 'tensorflow' not in sys.modules


def test_tfds_prepared_copy_without_its_builder_code(tmp_path):
  # A dataset prepared elsewhere whose builder class this process never defined.
  with tfds.core.registered.skip_registration():
    class SparseJaxUnregistered(SparseJaxTestLines):
      pass
  SparseJaxUnregistered(data_dir=tmp_path, file_format='array_record').download_and_prepare()
  it = data.make_iterator('tfds:sparse_jax_unregistered', 'test', seq_len=9, batch_size=2,
                          seed=0, shuffle=False, repeat=False, data_dir=str(tmp_path))
  got = stream_of(list(it))
  np.testing.assert_array_equal(got, tokens_of(LINES[40:])[:len(got)])


@pytest.mark.parametrize('name', ['sparse_jax_test_lines', 'lm1b', 'no_such_dataset_xyz'])
def test_tfds_not_prepared_says_how(tmp_path, name):
  with pytest.raises(data.DatasetNotPreparedError) as e:
    data.make_iterator(f'tfds:{name}', 'train', seq_len=8, batch_size=2, seed=0,
                       data_dir=str(tmp_path))
  msg = str(e.value)
  assert isinstance(e.value, ValueError) and '\n' not in msg
  assert '--config.data.data_dir' in msg
  if name == 'no_such_dataset_xyz':        # a typo: no `tfds build` of a name tfds lacks
    assert 'is not a dataset' in msg and 'list_builders' in msg and 'tfds build' not in msg
  else:
    assert f'tfds build {name} --file_format=array_record --data_dir={tmp_path}' in msg
