"""The README's code examples run as written."""
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / 'README.md'


def _block(section):
  text = README.read_text()
  part = text[text.index(section):]
  return re.search(r'```python\n(.*?)```', part, re.S).group(1)


def _run(code):
  scope = {}
  exec(compile(code, 'README.md', 'exec'), scope)
  return scope


def test_api_tour_runs():
  scope = _run(_block('## API tour'))
  assert scope['y_ep'].shape == (8, 32, 64)
  assert scope['C'] == 8


def test_pruning_example_runs():
  scope = _run(_block('## Pruning and sparsity'))
  assert abs(float((scope['params']['ffn']['wi'] == 0).mean()) - 0.9) < 1e-3
  assert int(scope['m'].reshape(16, 4, 256).sum(1).max()) == 2
  assert scope['fan_in'].min() == scope['fan_in'].max() == 16
