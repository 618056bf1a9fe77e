"""The README's API tour runs as written."""
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / 'README.md'


def test_api_tour_runs():
  text = README.read_text()
  tour = text[text.index('## API tour'):]
  code = re.search(r'```python\n(.*?)```', tour, re.S).group(1)
  scope = {}
  exec(compile(code, 'README.md', 'exec'), scope)
  assert scope['y_ep'].shape == (8, 32, 64)
  assert scope['C'] == 8
