"""Generation: a KV cache changes the cost, never the tokens.

Greedy generation equals the naive loop that re-runs the whole sequence and appends its
argmax, with the model switched to dropless routing (MoE layers never drop a token while
generating), on one device and on data x expert meshes; sampling is seeded; every family
fixture generates transformers' own greedy continuation; bad input fails before compile.
"""
import dataclasses
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_jax import dispatch, hub, inference, routing, sharding
from sparse_jax import moe as moe_lib
from sparse_jax.config import load_config, model_spec
from sparse_jax.inference import generation, sampling
from sparse_jax.models import TransformerLM
from sparse_jax.moe import MoE

ROOT = pathlib.Path(__file__).resolve().parents[1]
HF = ROOT / 'tests' / 'hf'

# Small models whose continuations vary (untied output, unit init): a model that only
# repeats its last token would make every comparison pass.
VARIANTS = {
    'dense': dict(num_experts=0),
    'switch': dict(num_experts=4, k=1, dispatch='index', capacity_factor=1.0),
    'top2': dict(num_experts=4, k=2, dispatch='einsum'),
    'shared': dict(num_experts=4, k=2, shared_d_ff=32, shared_gate=True),
    'swiglu': dict(num_experts=8, k=2, dispatch='dropless', activation='swiglu'),
}


def _spec(variant):
  c = load_config(ROOT / 'configs' / 'tiny.py')
  moe = dict(VARIANTS[variant])
  c.model.activation = moe.pop('activation', c.model.activation)
  c.model.update(tie_embeddings=False, init_scale=1.0, num_kv_heads=1)
  c.moe.update(init_scale=1.0, **moe)
  return model_spec(c)


def _model(spec, mesh=None):
  if mesh is None:
    return TransformerLM(spec, rngs=nnx.Rngs(1))
  with jax.set_mesh(mesh):
    return TransformerLM(spec, mesh=mesh, rngs=nnx.Rngs(1))


def _naive(model, spec, rows, n):
  """The reference: the same parameters, dropless, on one device, the whole sequence
  re-run for every token. Rows sit at the left of one [B, L] buffer: in a causal model
  with per-token (dropless) routing, what follows a row's end changes nothing before it,
  so one compilation serves every step."""
  if spec.moe is not None:
    spec = dataclasses.replace(spec, moe=dataclasses.replace(spec.moe, dispatch='dropless'))
  ref = TransformerLM(spec, rngs=nnx.Rngs(0))
  nnx.update(ref, jax.device_get(nnx.state(model)))
  forward = nnx.jit(lambda m, t: jnp.argmax(m(t)[0], -1))
  lengths = np.array([len(r) for r in rows])
  buf = np.zeros((len(rows), lengths.max() + n), np.int32)
  for i, r in enumerate(rows):
    buf[i, :len(r)] = r
  for step in range(n):
    at = lengths + step
    buf[np.arange(len(rows)), at] = np.asarray(forward(ref, jnp.asarray(buf)))[
        np.arange(len(rows)), at - 1]
  return np.stack([buf[i, l:l + n] for i, l in enumerate(lengths)])


ROWS = [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3], [27, 18], list(range(40, 53)), [200]]


# The default tier covers every variant once and both meshes; -m slow the full matrix.
_DEFAULT = {('dense', None), ('switch', (2, 4)), ('top2', None), ('shared', (2, 4)),
            ('swiglu', None)}


@pytest.mark.parametrize('variant,mesh_shape', [
    pytest.param(v, m, id=f'{v}-{"one_device" if m is None else "data2_expert4"}',
                 marks=() if (v, m) in _DEFAULT else pytest.mark.slow)
    for v in sorted(VARIANTS) for m in (None, (2, 4))])
def test_greedy_generation_equals_the_naive_loop(variant, mesh_shape):
  spec = _spec(variant)
  mesh = None if mesh_shape is None else sharding.make_mesh(*mesh_shape)
  model = _model(spec, mesh)
  n = 12
  new = np.asarray(inference.generate(model, ROWS, n))     # ragged: left-padded
  want = _naive(model, spec, ROWS, n)
  np.testing.assert_array_equal(new, want)
  assert len(set(want.ravel())) > 4                         # the comparison can fail


_SLOW_FAMILIES = ('mistral', 'olmoe', 'qwen3_moe')     # llama, mixtral, qwen2_moe cover them


@pytest.mark.parametrize('family', [
    pytest.param(p.name, marks=pytest.mark.slow if p.name in _SLOW_FAMILIES else ())
    for p in sorted(HF.iterdir()) if (p / 'reference.npz').exists()])
def test_each_family_generates_transformers_greedy_continuation(family):
  ref = np.load(HF / family / 'reference.npz')
  model, _ = hub.load_hf(HF / family)
  new = inference.generate(model, ref['prompt'], ref['greedy'].shape[1])
  np.testing.assert_array_equal(np.asarray(new), ref['greedy'])


@pytest.mark.parametrize('family', ['mixtral', pytest.param('qwen2_moe', marks=pytest.mark.slow),
                                    pytest.param('deepseek_v3', marks=pytest.mark.slow)])
def test_moe_families_generate_the_same_on_an_expert_parallel_mesh(family):
  """The experts stay split over 'expert' and the batch (1 row, padded to the 8 token
  shards) and its cache over ('data', 'expert')."""
  ref = np.load(HF / family / 'reference.npz')
  mesh = sharding.make_mesh(2, 4)
  model, _ = hub.load_hf(HF / family, mesh=mesh)
  new = inference.generate(model, ref['prompt'][:1], 6)
  np.testing.assert_array_equal(np.asarray(new), ref['greedy'][:1, :6])
  expert = next(m for m in model.moe_layers().values()).experts.wi
  assert expert[...].sharding.spec[0] == 'expert'
  graphdef, state = nnx.split(model)
  tokens = jax.device_put(jnp.zeros((8, 8), jnp.int32), sharding.batch_sharding(mesh))
  _, cache = jax.jit(lambda s, t: generation._prefill(
      graphdef, s, t, jnp.zeros(8, jnp.int32), jax.random.key(0), length=16, mesh=mesh,
      settings=dict(temperature=0.0, top_k=0, top_p=1.0)))(state, tokens)
  for layer in cache:
    for x in layer.values():
      assert x.sharding.spec[0] == ('data', 'expert'), x.sharding


def test_latent_attention_caches_its_latent_and_rope_key():
  model, spec = hub.load_hf(HF / 'deepseek_v3')
  cache = model.init_cache(2, 16)
  assert {k: v.shape for k, v in cache[0].items()} == {
      'latent': (2, 16, spec.kv_lora_rank), 'k_rope': (2, 16, spec.qk_rope_head_dim)}


def test_sampling_is_seeded_and_respects_top_k_and_top_p():
  model = _model(_spec('dense'))
  kw = dict(temperature=1.0, top_k=20, top_p=0.9)
  a = np.asarray(inference.generate(model, ROWS, 10, seed=3, **kw))
  b = np.asarray(inference.generate(model, ROWS, 10, seed=3, **kw))
  c = np.asarray(inference.generate(model, ROWS, 10, seed=4, **kw))
  np.testing.assert_array_equal(a, b)
  assert (a != c).any()
  # By hand: probabilities 0.5, 0.3, 0.15, 0.05 at ids 2, 0, 3, 1.
  logits = jnp.log(jnp.array([[0.3, 0.05, 0.5, 0.15]]))
  draws = lambda **kw: {int(sampling.sample(logits, jax.random.key(i), temperature=1.0,
                                             **kw)[0]) for i in range(200)}
  assert draws() == {0, 1, 2, 3}
  assert draws(top_k=2) == {0, 2}
  assert draws(top_p=0.8) == {0, 2}                 # 0.5 + 0.3 reach 0.8: 3 and 1 are cut
  assert draws(top_p=0.81) == {0, 2, 3}
  assert draws(top_p=0.4) == {2}                    # the most likely token always stays


def test_eos_ends_a_row_and_every_row_ending_ends_generation():
  spec = _spec('dense')
  model = _model(spec)
  greedy = np.asarray(inference.generate(model, ROWS, 10))
  eos = int(greedy[0, 3])
  new = np.asarray(inference.generate(model, ROWS, 10, eos_id=eos))
  for row, ref in zip(new, greedy):
    hits = np.flatnonzero(ref == eos)
    end = hits[0] if len(hits) else len(ref)
    np.testing.assert_array_equal(row[:end + 1], ref[:end + 1])
    assert (row[end:] == eos).all()
  seen = []
  out, t = generation.run(model, [ROWS[0]], 10, eos_id=eos, on_token=seen.append)
  assert len(seen) == 4 and t.decode_tokens == 3          # stopped once the row ended
  np.testing.assert_array_equal(np.asarray(out)[0], [*greedy[0, :4]] + [eos] * 6)


def test_one_compilation_per_batch_bucket_and_length():
  model = _model(_spec('switch'))
  inference.generate(model, [[1, 2, 3]], 4)
  compiled = len(generation._COMPILED)
  inference.generate(model, [[9, 8, 7, 6, 5]], 4)           # the same bucket (8)
  assert len(generation._COMPILED) == compiled
  inference.generate(model, [list(range(1, 12))], 4)        # bucket 16: a new pair
  assert len(generation._COMPILED) == compiled + 2


@pytest.mark.parametrize('kwargs,words', [
    (dict(prompt=[[]]), 'the prompt is empty'),
    (dict(prompt=[]), 'the prompt is empty'),
    (dict(prompt=[[1, 300]]), 'token id 300 is outside the vocabulary'),
    (dict(prompt=[[-1]]), 'token id -1 is outside the vocabulary'),
    (dict(max_len=10), 'past max_len=10'),
    (dict(temperature=-0.5), 'temperature=-0.5 must be >= 0'),
    (dict(top_p=0.0), r'top_p=0.0 must be in \(0, 1\]'),
    (dict(top_p=1.5), r'top_p=1.5 must be in \(0, 1\]'),
    (dict(top_k=-1), 'top_k=-1 must be >= 0'),
    (dict(max_new_tokens=0), 'max_new_tokens=0 must be an integer >= 1'),
])
def test_bad_input_is_one_clear_error_before_anything_compiles(kwargs, words, monkeypatch):
  model = _model(_spec('dense'))
  monkeypatch.setattr(jax, 'jit', lambda *a, **k: pytest.fail('compiled before checking'))
  kw = {'prompt': [[1, 2, 3]], 'max_new_tokens': 8, **kwargs}
  with pytest.raises(inference.GenerationError, match=words):
    inference.generate(model, kw.pop('prompt'), kw.pop('max_new_tokens'), **kw)


def test_expert_choice_is_refused_for_generation():
  layer = MoE(8, 16, 4, routing='expert_choice', allow_lookahead=True, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='cannot generate one token at a time'):
    layer.generate(jnp.ones((1, 1, 8)))


def test_generate_path_by_hand():
  """The gathered path while 2*T*K < E, and never on an expert axis."""
  assert [moe_lib.generate_path(t, 1, 8) for t in (1, 3, 4)] == ['chosen', 'chosen', 'dropless']
  assert [moe_lib.generate_path(t, 2, 8) for t in (1, 2)] == ['chosen', 'dropless']
  assert moe_lib.generate_path(1, 1, 8, ep=2) == 'dropless'


@pytest.mark.parametrize('tokens,path', [(1, 'chosen'), (3, 'dropless'), (16, 'dropless')])
def test_moe_generate_is_the_dropless_layer_by_either_path(tokens, path, monkeypatch):
  """A few tokens run only their experts' gathered weights, more the dropless grouped
  path; both equal the dropless layer, with a capacity-trained router."""
  kw = dict(k=2, shared_d_ff=16, rngs=nnx.Rngs(0))
  layer = MoE(8, 16, 8, dispatch='index', capacity_factor=0.5, **kw)
  ref = MoE(8, 16, 8, dispatch='dropless', **kw)
  nnx.update(ref, nnx.state(layer))
  taken = []
  chosen = dispatch.chosen_experts
  monkeypatch.setattr(dispatch, 'chosen_experts', lambda *a: taken.append(1) or chosen(*a))
  x = jax.random.normal(jax.random.key(1), (1, tokens, 8))
  np.testing.assert_allclose(nnx.jit(lambda m, x: m.generate(x))(layer, x),
                             nnx.jit(lambda m, x: m(x)[0])(ref, x), atol=1e-6)
  assert bool(taken) == (path == 'chosen')


def test_chosen_experts_by_hand():
  """Token 0 takes experts 2 and 0 with weights 0.75 / 0.25; token 1 only expert 1."""
  x = jnp.array([[1.0, 2.0], [3.0, -1.0]])
  w = {'w': jnp.stack([jnp.eye(2) * (e + 1) for e in range(3)])}          # expert e: (e+1) x
  plan = routing.RoutingPlan(expert=jnp.array([[2, 0], [1, 0]]),
                             weight=jnp.array([[0.75, 0.25], [1.0, 0.5]]),
                             slot=jnp.zeros((2, 2), jnp.int32),
                             kept=jnp.array([[True, True], [True, False]]))
  y = dispatch.chosen_experts(x, plan, w, lambda w, r: jnp.einsum('nld,nde->nle', r, w['w']))
  np.testing.assert_allclose(y, [[(0.75 * 3 + 0.25) * 1.0, (0.75 * 3 + 0.25) * 2.0],
                                 [6.0, -2.0]])


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """An imported model with its tokenizer (the byte path: test_text_as_bytes...)."""
  from sparse_jax import convert
  return convert.from_hf(str(HF / 'llama'), str(tmp_path_factory.mktemp('gen') / 'w'))


def _cli(*flags):
  return subprocess.run([sys.executable, '-m', 'sparse_jax.generate', *flags],
                        capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_the_command_line_streams_text_and_reports_speed(tmp_path, workdir):
  """Greedy text through the workdir's tokenizer is what generate() gives for its ids."""
  from tokenizers import Tokenizer
  w = workdir
  tok = Tokenizer.from_file(str(w / 'tokenizer.json'))
  ids = tok.encode('def f(').ids
  r = _cli(f'--workdir={w}', '--prompt=def f(', '--max_new_tokens=12', '--ignore_eos')
  assert r.returncode == 0, r.stderr
  model, _ = hub.load_hf(HF / 'llama')
  new = np.asarray(inference.generate(model, [ids], 12))[0].tolist()
  assert r.stdout == 'def f(' + tok.decode(new) + '\n'
  assert f'prefill: {len(ids)} tokens' in r.stderr and 'decode: 11 tokens' in r.stderr
  (tmp_path / 'p.txt').write_text('import os\n\nclass A:\n')
  r = _cli(f'--workdir={w}', f'--prompt_file={tmp_path / "p.txt"}', '--num_samples=2',
           '--temperature=0.9', '--max_new_tokens=5')
  assert r.returncode == 0, r.stderr
  assert r.stdout.count('--- prompt') == 4 and '--- prompt 2, sample 2\nclass A:' in r.stdout


@pytest.mark.parametrize('flags,words', [
    (['--prompt='], 'the prompt is empty'),
    (['--prompt=x', '--top_p=0'], 'top_p=0.0 must be in'),
    (['--prompt=x', '--max_len=4', '--max_new_tokens=8'], 'past max_len=4'),
    ([], 'give exactly one of --prompt=TEXT and --prompt_file=FILE'),
])
def test_the_command_line_refuses_bad_input_with_one_line(workdir, flags, words):
  r = _cli(f'--workdir={workdir}', *flags)
  assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_the_command_line_without_a_checkpoint_exits_2(tmp_path):
  r = _cli(f'--workdir={tmp_path}', '--prompt=x')
  assert r.returncode == 2 and 'no checkpoint' in r.stderr


def test_text_as_bytes_streams_whole_characters():
  """The project's own models speak UTF-8 bytes: a character split over tokens is
  written once it is whole."""
  import io
  from sparse_jax.generate import Stream, Text
  text, out = Text(None), io.StringIO()
  assert text.encode('é!') == [0xC3, 0xA9, 0x21]
  stream = Stream(text, eos=0, out=out)
  stream(0xC3)
  assert out.getvalue() == ''
  for t in (0xA9, 0x21, 0, 0x41):                            # nothing after eos
    stream(t)
  assert out.getvalue() == 'é!'
