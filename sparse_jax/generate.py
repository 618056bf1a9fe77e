"""Generate text from a workdir's model.

  python -m sparse_jax.generate --workdir=W --prompt=TEXT [--max_new_tokens=N
      --temperature=T --top_k=K --top_p=P --seed=S --num_samples=M --cpu_devices=D]
  python -m sparse_jax.generate --workdir=W --prompt_file=F ...   (one prompt per line)

The model is the workdir's newest verified checkpoint (sparse_jax.train, compress or
convert --from_hf), on every device here. Text is bytes for the project's own models and
the workdir's tokenizer (data.tokenizer) for imported ones. A single completion streams
to stdout as it is made; several (prompts x --num_samples) print when done, each under a
header. Generation stops at the data's end-of-document token (data.eod_id) unless
--ignore_eos. Prefill and decode tokens per second go to stderr at the end. Bad input
exits 2 with one line, before anything compiles.
"""
from __future__ import annotations

import codecs
import pathlib
import sys

from absl import flags

from sparse_jax import cli

FLAGS = flags.FlagValues()
_DEFINE = dict(flag_values=FLAGS)
flags.DEFINE_string('workdir', None, 'The workdir whose model generates.', **_DEFINE)
flags.DEFINE_string('prompt', None, 'The prompt text.', **_DEFINE)
flags.DEFINE_string('prompt_file', None, 'A file with one prompt per line.', **_DEFINE)
flags.DEFINE_integer('max_new_tokens', 128, 'Tokens to generate per sample.', **_DEFINE)
flags.DEFINE_float('temperature', 0.0, '0 is greedy.', **_DEFINE)
flags.DEFINE_integer('top_k', 0, 'Sample from the K most likely tokens (0: all).', **_DEFINE)
flags.DEFINE_float('top_p', 1.0, 'Sample from the most likely tokens holding this much '
                   'probability (1: all).', **_DEFINE)
flags.DEFINE_integer('seed', 0, 'Sampling seed.', **_DEFINE)
flags.DEFINE_integer('num_samples', 1, 'Samples per prompt.', lower_bound=1, **_DEFINE)
flags.DEFINE_integer('max_len', None, 'KV-cache slots (default: prompt + new tokens).',
                     **_DEFINE)
flags.DEFINE_bool('ignore_eos', False, 'Do not stop at the end-of-document token.',
                  **_DEFINE)
flags.DEFINE_integer('cpu_devices', None, 'Simulate this many CPU devices (CPU only).',
                     lower_bound=1, **_DEFINE)


class Text:
  """Text <-> token ids: UTF-8 bytes, or a tokenizer.json."""

  def __init__(self, tokenizer: str | None):
    self.tok = None
    if tokenizer:
      from tokenizers import Tokenizer
      self.tok = Tokenizer.from_file(tokenizer)

  def encode(self, text: str) -> list[int]:
    return list(text.encode('utf-8')) if self.tok is None else self.tok.encode(text).ids

  def decode(self, ids) -> str:
    if self.tok is None:
      return bytes(int(i) for i in ids).decode('utf-8', errors='replace')
    return self.tok.decode([int(i) for i in ids])


class Stream:
  """Writes one row's text as its tokens arrive (bytes: an incremental UTF-8 decoder;
  a tokenizer: the decoded text's new suffix, since pieces merge across tokens)."""

  def __init__(self, text: Text, eos: int | None, out=sys.stdout):
    self.text, self.eos, self.out, self.ids, self.shown = text, eos, out, [], ''
    self.utf8 = codecs.getincrementaldecoder('utf-8')(errors='replace')
    self.ended = False

  def __call__(self, token: int):
    self.ended = self.ended or token == self.eos
    if self.ended:
      return
    if self.text.tok is None:
      piece = self.utf8.decode(bytes([int(token)]))
    else:
      self.ids.append(int(token))
      full = self.text.decode(self.ids)
      piece, self.shown = full[len(self.shown):], full
    self.out.write(piece)
    self.out.flush()


def _prompts() -> list[str]:
  if bool(FLAGS.prompt is not None) == bool(FLAGS.prompt_file):
    raise ValueError('give exactly one of --prompt=TEXT and --prompt_file=FILE')
  if FLAGS.prompt is not None:
    return [FLAGS.prompt]
  path = pathlib.Path(FLAGS.prompt_file)
  if not path.is_file():
    raise ValueError(f'--prompt_file={path} is not a file')
  lines = [l for l in path.read_text(encoding='utf-8').splitlines() if l.strip()]
  if not lines:
    raise ValueError(f'--prompt_file={path} has no non-empty line: the prompt is empty')
  return lines


def main(argv=None):
  argv = sys.argv if argv is None else argv
  try:
    FLAGS(argv)
    if not FLAGS.workdir:
      raise ValueError('--workdir is required')
    prompts = _prompts()
  except (flags.Error, ValueError) as e:
    cli.die(e)
  cli.setup(FLAGS.cpu_devices)
  import jax
  from sparse_jax.inference import generation
  from sparse_jax.training import checkpoint
  settings = dict(temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p)
  try:
    generation.check_settings(FLAGS.max_new_tokens, **settings)
    _, spec, model = checkpoint.load_model(pathlib.Path(FLAGS.workdir))
    text = Text(spec.data_tokenizer)
    rows = [text.encode(p) for p in prompts for _ in range(FLAGS.num_samples)]
    generation.check_prompt(rows, FLAGS.max_new_tokens, spec.model.vocab_size,
                            FLAGS.max_len)
  except (ValueError, OSError) as e:     # GenerationError, NoCheckpointError, SpecError, ...
    cli.die(e)
  eos = None if FLAGS.ignore_eos else spec.eod_id
  stream = Stream(text, eos) if len(rows) == 1 else None
  if stream is not None:
    sys.stdout.write(prompts[0])
  new, t = generation.run(model, rows, FLAGS.max_new_tokens, seed=FLAGS.seed, eos_id=eos,
                          max_len=FLAGS.max_len,
                          on_token=stream and (lambda ids: stream(ids[0])), **settings)
  if stream is None:
    for i, ids in enumerate(jax.device_get(new).tolist()):
      p = i // FLAGS.num_samples
      print(f'--- prompt {p + 1}, sample {i % FLAGS.num_samples + 1}\n{prompts[p]}'
            f'{text.decode(ids[:ids.index(eos)] if eos in ids else ids)}')
  else:
    print()
  print(f'prefill: {t.prefill_tokens} tokens in {t.prefill_s:.3f} s '
        f'({t.prefill_tokens / max(t.prefill_s, 1e-9):,.0f} tokens/s); decode: '
        f'{t.decode_tokens} tokens in {t.decode_s:.3f} s '
        f'({t.decode_tokens / max(t.decode_s, 1e-9):,.1f} tokens/s); compile '
        f'{t.compile_s:.1f} s', file=sys.stderr)


if __name__ == '__main__':
  main()
