"""python -m sparse_jax.evaluate: the loss a workdir's model makes on text, computed here
by hand from the same token windows, without touching the workdir."""
import hashlib
import json
import math
import pathlib
import shutil

import numpy as np
import pytest
from flax import nnx

from sparse_jax import hub

ROOT = pathlib.Path(__file__).resolve().parents[1]
HF = ROOT / 'tests' / 'hf'
TEXT = ('def mean(xs):\n    """The average of a non-empty list."""\n    return sum(xs) / '
        'len(xs)\n\n\nclass Stack:\n    def __init__(self):\n        self.items = []\n')


def _cli(capsys, *flags):
  """The command in this process (8 devices, as a subprocess here would see): (exit code,
  stdout, stderr)."""
  from sparse_jax import evaluate
  try:
    evaluate.main(['evaluate', *flags])
    code = 0
  except SystemExit as e:
    code = e.code
  out = capsys.readouterr()
  return code, out.out, out.err


def _digest(folder: pathlib.Path) -> dict:
  return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(folder.rglob('*')) if p.is_file()}


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """An imported MoE: the mixtral fixture with the llama fixture's tokenizer (same vocab)."""
  from sparse_jax import convert
  root = tmp_path_factory.mktemp('ev')
  shutil.copytree(HF / 'mixtral', root / 'hf')
  for name in ('tokenizer.json', 'tokenizer_config.json'):
    shutil.copy(HF / 'llama' / name, root / 'hf')
  return convert.from_hf(str(root / 'hf'), str(root / 'w'))


def test_loss_on_text_files_is_the_models_cross_entropy(workdir, tmp_path, capsys):
  """The command's loss equals the mean next-token cross-entropy of the first batch of
  windows of the file's token stream (its ids, then the end-of-document id), computed
  with numpy from the model's logits; the workdir is unchanged."""
  from tokenizers import Tokenizer
  (tmp_path / 'a.py').write_text(TEXT)
  before = _digest(workdir)
  code, stdout, stderr = _cli(capsys, f'--workdir={workdir}', f'--data=files:{tmp_path}/*.py',
                              '--batch_size=8', '--seq_len=6', '--batches=1')
  assert code == 0, stderr
  out = json.loads(stdout)
  assert _digest(workdir) == before
  model, spec = hub.load_hf(HF / 'mixtral')
  tok = Tokenizer.from_file(str(workdir / 'tokenizer.json'))
  eos = tok.token_to_id('</s>')                         # tokenizer_config's eos_token
  stream = tok.encode(TEXT, add_special_tokens=False).ids + [eos]
  assert len(stream) >= 8 * 7
  rows = np.asarray(stream[:8 * 7]).reshape(8, 7)
  logits = np.asarray(nnx.jit(lambda m, t: m(t)[0])(model, rows[:, :-1]), np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  want = -np.take_along_axis(logp, rows[:, 1:, None], -1).mean()
  assert out['loss'] == pytest.approx(want, rel=1e-5)
  assert out['bits_per_token'] == pytest.approx(want / math.log(2), rel=1e-5)
  assert (out['split'], out['batches'], out['tokens']) == ('all', 1, 48)
  assert len(out['moe/0/expert_load']) == spec.moe.num_experts


@pytest.mark.parametrize('flags,words', [
    (['--data=files:/nonexistent/*.txt'], 'matches no files'),
    (['--batch_size=3'], '--batch_size=3 does not split over the 8 devices'),
    (['--split=test'], "splits 'train', 'validation'"),
    (['--batches=-1'], 'batches'),
])
def test_bad_input_exits_2_with_one_line(workdir, tmp_path, flags, words, capsys):
  (tmp_path / 'a.py').write_text(TEXT)
  if not any(f.startswith('--data') for f in flags):
    flags = [f'--data=files:{tmp_path}/*.py', *flags]
  code, _, stderr = _cli(capsys, f'--workdir={workdir}', *flags)
  assert code == 2 and words in stderr, stderr
  assert len(stderr.strip().splitlines()) == 1, stderr


def test_a_workdir_without_a_checkpoint_exits_2(tmp_path, capsys):
  code, _, stderr = _cli(capsys, f'--workdir={tmp_path}')
  assert code == 2 and 'no checkpoint' in stderr
