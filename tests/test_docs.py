"""The docs cannot rot: README.md and every docs/*.md page are held to the code.

- Every ```python block runs; the blocks of one page run in order in one shared scope, so a
  page can build on its earlier blocks. A block that must not run is fenced ```python-norun
  or ```text instead.
- Every relative link resolves to a file of the repository, and every #anchor into a markdown
  file names one of its headings (GitHub's slug rules).
- The config-key table of docs/training.md lists exactly the leaves of base_config(), each with
  its default.
"""
import ast
import functools
import pathlib
import re

import ml_collections
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = ['README.md'] + sorted(f'docs/{p.name}' for p in (ROOT / 'docs').glob('*.md'))
# Pages whose code trains or compiles enough to belong to the slow tier (the extending
# example is also tests/test_extending.py's, in the default tier).
SLOW = {'docs/loading.md', 'docs/extending.md', 'docs/expert-parallelism.md'}

FENCE = re.compile(r'^```([^\n`]*)\n(.*?)^```[ \t]*$', re.S | re.M)


def _text(page):
  return (ROOT / page).read_text()


def code_blocks(page, lang='python'):
  """[(first line number, source)] of the page's fenced blocks tagged `lang`."""
  text = _text(page)
  return [(text.count('\n', 0, m.start(2)) + 1, m.group(2)) for m in FENCE.finditer(text)
          if m.group(1).strip() == lang]


def run_blocks(page):
  """Run the page's python blocks in order in one scope; returns the scope. Tracebacks
  name the page and its own line numbers."""
  scope = {'__name__': f'docs:{page}'}
  for line, source in code_blocks(page):
    exec(compile('\n' * (line - 1) + source, str(ROOT / page), 'exec'), scope)
  return scope


def _section_has_python(page, heading):
  """The section under `heading` (up to the next heading of its level) has a python block."""
  text = _text(page)
  body = text[text.index(f'\n{heading}\n') + len(heading) + 2:]
  end = re.search(rf'^#{{1,{len(heading.split()[0])}}} ', body, re.M)
  return '```python\n' in (body if end is None else body[:end.start()])


def _readme_computes_what_it_says(scope):
  assert _section_has_python('README.md', '## API tour')
  assert scope['y_ep'].shape == (8, 32, 64)
  assert scope['C'] == 8


def _pruning_page_computes_what_it_says(scope):
  assert _section_has_python('docs/pruning.md', '## The pruning optimizer')
  assert abs(float((scope['params']['ffn']['wi'] == 0).mean()) - 0.9) < 1e-3
  assert int(scope['m'].reshape(16, 4, 256).sum(1).max()) == 2
  assert scope['fan_in'].min() == scope['fan_in'].max() == 16


# What some pages' examples must have computed, beyond running.
CHECKS = {'README.md': _readme_computes_what_it_says,
          'docs/pruning.md': _pruning_page_computes_what_it_says}


def _pages(slow=frozenset()):
  return [pytest.param(p, id=p, marks=[pytest.mark.slow] if p in slow else []) for p in PAGES]


# ----------------------------------------------------------------------- code blocks

@pytest.fixture
def tiny_run(tmp_path, data_dir, monkeypatch):
  """A directory holding runs/tiny: 2 trained steps of configs/tiny.py (the workdir that
  docs/loading.md loads), made the working directory."""
  from sparse_jax.config import load_config
  from sparse_jax.training import loop
  monkeypatch.setenv('SPARSE_JAX_DATA', data_dir)
  c = load_config(ROOT / 'configs' / 'tiny.py')
  c.train.steps = c.train.eval_every = c.train.checkpoint_every = 2
  assert loop.train(c, tmp_path / 'runs' / 'tiny') == 0
  monkeypatch.chdir(tmp_path)
  return tmp_path


@pytest.mark.parametrize('page', _pages(SLOW))
def test_page_code_runs(page, request):
  fences = {m.group(1).strip() for m in FENCE.finditer(_text(page))}
  sneaky = fences & {'py', 'python3', 'Python', 'pycon'}
  assert not sneaky, f'{page}: fence {sneaky} would escape this test; use ```python or ```text'
  if page == 'docs/loading.md':
    request.getfixturevalue('tiny_run')
  else:
    request.getfixturevalue('monkeypatch').chdir(ROOT)
  scope = run_blocks(page)
  if page in CHECKS:
    CHECKS[page](scope)


# ----------------------------------------------------------------------------- links

LINK = re.compile(r'!?\[[^\]\n]*\]\(([^)\s]+)(?:\s+"[^"]*")?\)')
HEADING = re.compile(r'^(#{1,6})[ \t]+(.+?)[ \t#]*$', re.M)


def _no_fences(text):
  """The text with fenced blocks blanked (line numbers kept)."""
  return FENCE.sub(lambda m: '\n' * m.group(0).count('\n'), text)


def _prose(text):
  """The page without fenced blocks and with inline code spans emptied (links and
  headings there are not links and headings)."""
  return re.sub(r'`[^`\n]*`', '``', _no_fences(text))


def slug(heading):
  """GitHub's anchor for a heading: rendered text, lowercase, spaces to '-', punctuation
  other than '-' and '_' removed."""
  text = re.sub(r'\[([^\]]*)\]\([^)]*\)', r'\1', heading)         # [text](url) -> text
  text = text.replace('`', '').replace('*', '')
  text = re.sub(r'[^\w\- ]', '', text.strip().lower())
  return text.replace(' ', '-')


@functools.cache
def anchors(path):
  """Anchors of a markdown file's headings (duplicates get -1, -2, ... as on GitHub)."""
  text = _no_fences(path.read_text())
  seen, out = {}, set()
  for _, title in HEADING.findall(text):
    s = slug(title)
    n = seen.get(s, 0)
    seen[s] = n + 1
    out.add(s if n == 0 else f'{s}-{n}')
  return out


def test_slug_rules():
  assert slug('API tour') == 'api-tour'
  assert slug('Dense vs MoE (`compare.py --preset=full`)') == 'dense-vs-moe-comparepy---presetfull'
  assert slug('constraints.txt') == 'constraintstxt'
  assert slug('What FSDP, remat and bfloat16 buy') == 'what-fsdp-remat-and-bfloat16-buy'
  assert slug('moe_every & **bold**') == 'moe_every--bold'


@pytest.mark.parametrize('page', _pages())
def test_relative_links_resolve(page):
  source = ROOT / page
  links = LINK.findall(_prose(source.read_text()))
  bad = []
  for target in links:
    if re.match(r'(https?|mailto):', target):
      continue
    path, _, anchor = target.partition('#')
    dest = (source.parent / path).resolve() if path else source
    if not dest.is_relative_to(ROOT):
      bad.append(f'{target}: outside the repository')
    elif not dest.exists():
      bad.append(f'{target}: no such file')
    elif anchor and dest.suffix == '.md' and anchor not in anchors(dest):
      bad.append(f'{target}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}')
  assert not bad, f'{page}: ' + '; '.join(bad)


def test_readme_links_every_docs_page():
  linked = {(ROOT / t.partition('#')[0]).resolve()
            for t in LINK.findall(_prose(_text('README.md')))}
  missing = [p for p in PAGES[1:] if (ROOT / p).resolve() not in linked]
  assert not missing, f'README.md does not link {missing}'


# ------------------------------------------------------------------------ config keys

def _flat(config, prefix=''):
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from _flat(value, f'{prefix}{key}.')
    else:
      yield f'{prefix}{key}', value


def _cells(row):
  return [c.strip() for c in re.split(r'(?<!\\)\|', row.strip().strip('|'))]


def config_table():
  """{key: default text} of the `key | default | meaning` table in docs/training.md."""
  lines = _no_fences(_text('docs/training.md')).splitlines()
  start = next(i for i, line in enumerate(lines)
               if line.startswith('|') and _cells(line) == ['key', 'default', 'meaning'])
  rows = {}
  for line in lines[start + 2:]:
    if not line.startswith('|'):
      break
    key, default, _ = _cells(line)
    assert key.startswith('`') and key.endswith('`'), f'key not in backticks: {line}'
    assert default.startswith('`') and default.endswith('`'), f'default not in backticks: {line}'
    assert key not in rows, f'{key} listed twice'
    rows[key.strip('`')] = default[1:-1]
  return rows


def _plain(value):
  return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def test_config_table_matches_base_config():
  from sparse_jax.config import base_config
  want = dict(_flat(base_config()))
  have = config_table()
  assert sorted(set(want) - set(have)) == [], 'keys of base_config() without a row'
  assert sorted(set(have) - set(want)) == [], 'rows for keys base_config() lacks'
  wrong = []
  for key, text in have.items():
    doc = _plain(ast.literal_eval(text))
    value = _plain(want[key])
    if doc != value or type(doc) is not type(value):
      wrong.append(f'{key}: docs say {text}, base_config() has {want[key]!r}')
  assert not wrong, '; '.join(wrong)
