"""Data: byte-level language modelling (vocab 256) through one grain pipeline.

  info = data.prepare('stdlib', data_dir=None)        # build once, describe (fingerprint)
  it = data.make_iterator('stdlib', 'train', seq_len=256, batch_size=32, seed=0)
  batch = next(it)                                     # {'inputs', 'targets'}: int32[b, L]

Sources: 'stdlib' (the Python standard library's *.py files, a TFDS dataset built here
into array_record, no TensorFlow), 'tfds:NAME[/CONFIG][:VERSION][:FEATURE]' (a prepared
TFDS dataset), 'files:GLOB[,GLOB...]' (text files). Files: corpus.py (the TFDS builder),
sources.py (source strings -> documents), pipeline.py (grain), hashing.py (split rule,
fingerprints).
"""
from sparse_jax.data import corpus, hashing, pipeline, sources
from sparse_jax.data.pipeline import EOD_TOKEN, VOCAB_SIZE, make_iterator, tokenize
from sparse_jax.data.sources import DatasetNotPreparedError, prepare

__all__ = ['DatasetNotPreparedError', 'EOD_TOKEN', 'VOCAB_SIZE', 'corpus', 'hashing',
           'make_iterator', 'pipeline', 'prepare', 'sources', 'tokenize']
