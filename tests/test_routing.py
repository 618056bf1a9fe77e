"""Routing math (sparse_jax.routing) against hand-computed cases and properties.

The semantics are docs/moe.md's "Routing semantics": choice-major slot priority, weights from
the unbiased probs, renormalisation (K >= 2) before dropping, C = ceil(cf*K*S/E) >= 1.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import sparse_jax as sj

R = sj.routing


def sigmoid(z):
  return 1.0 / (1.0 + math.exp(-z))


def np_plan(plan):
  return {f: np.asarray(getattr(plan, f)) for f in plan._fields}


# ------------------------------------------------------------------ top-k hand cases

def test_switch_k1_capacity1_drops_later_tokens():
  # 4 tokens, 2 experts, k=1: C = ceil(0.5 * 1 * 4 / 2) = 1.
  c = R.capacity(4, 2, 1, 0.5)
  assert c == 1
  # Argmax experts: [0, 0, 1, 0]. Expert 0's queue is t0 (slot 0), t1 (1), t3 (2);
  # expert 1's queue is t2 (slot 0). With C=1 only t0 and t2 keep a slot.
  logits = jnp.array([[2., 0.], [1., 0.], [0., 1.], [3., 0.]])
  p = np_plan(R.route_top_k(logits, 1, c))
  np.testing.assert_array_equal(p['expert'][:, 0], [0, 0, 1, 0])
  np.testing.assert_array_equal(p['slot'][:, 0], [0, 1, 0, 2])
  np.testing.assert_array_equal(p['kept'][:, 0], [True, False, True, False])
  # Switch weight = softmax prob of the chosen expert; with 2 experts that is
  # sigmoid(logit difference): t0 -> sigmoid(2), t2 -> sigmoid(1); dropped -> 0.
  np.testing.assert_allclose(p['weight'][:, 0], [sigmoid(2), 0, sigmoid(1), 0], rtol=1e-6)
  assert (p['slot'][~p['kept']] >= c).all()


# Each row is a permutation of [2, 1, 0], so every token's top-2 renormalised weights are
# e^2/(e^2+e) = sigmoid(1) and e/(e^2+e) = 1 - sigmoid(1).
#   first choices : t0->e0, t1->e1, t2->e2, t3->e1
#   second choices: t0->e1, t1->e0, t2->e0, t3->e2
TOP2_LOGITS = jnp.array([[2., 1., 0.], [1., 2., 0.], [1., 0., 2.], [0., 2., 1.]])


def test_top2_first_choices_before_second_choices():
  c = R.capacity(4, 3, 2, 0.75)                    # ceil(0.75 * 2 * 4 / 3) = 2
  assert c == 2
  p = np_plan(R.route_top_k(TOP2_LOGITS, 2, c))
  np.testing.assert_array_equal(p['expert'], [[0, 1], [1, 0], [2, 0], [1, 2]])
  # Queues, all first choices first:
  #   e0: t0(1st) 0, t1(2nd) 1, t2(2nd) 2 -> dropped
  #   e1: t1(1st) 0, t3(1st) 1, t0(2nd) 2 -> dropped
  #   e2: t2(1st) 0, t3(2nd) 1
  # Token-major order would have given t0's 2nd choice e1 slot 0 and dropped t3's 1st.
  np.testing.assert_array_equal(p['slot'], [[0, 2], [0, 1], [0, 2], [1, 1]])
  np.testing.assert_array_equal(
      p['kept'], [[True, False], [True, True], [True, False], [True, True]])
  assert not p['kept'][0, 1] and p['kept'][3, 0]


def test_top2_renormalised_before_dropping():
  a, b = sigmoid(1), 1 - sigmoid(1)
  p = np_plan(R.route_top_k(TOP2_LOGITS, 2, 2))   # default normalize_weights for k=2
  # t0 and t2 lost their 2nd choice: the 1st keeps `a` (not re-renormalised to 1).
  np.testing.assert_allclose(p['weight'], [[a, 0], [a, b], [a, 0], [a, b]], rtol=1e-6)
  # Unlimited capacity: every row sums to 1.
  full = np_plan(R.route_top_k(TOP2_LOGITS, 2, 8))
  np.testing.assert_allclose(full['weight'].sum(-1), 1.0, rtol=1e-6)
  # normalize_weights=False: the raw probs e^2/Z, e/Z with Z = e^2 + e + 1.
  z = math.e ** 2 + math.e + 1
  raw = np_plan(R.route_top_k(TOP2_LOGITS, 2, 8, normalize_weights=False))
  np.testing.assert_allclose(raw['weight'], [[math.e ** 2 / z, math.e / z]] * 4, rtol=1e-6)


def test_k1_weight_is_prob_unless_normalized():
  logits = jnp.array([[1., 0.], [0., 3.]])
  p = np_plan(R.route_top_k(logits, 1, 4))
  # Switch: weight = softmax prob, not 1.
  np.testing.assert_allclose(p['weight'][:, 0], [sigmoid(1), sigmoid(3)], rtol=1e-6)
  n = np_plan(R.route_top_k(logits, 1, 4, normalize_weights=True))
  np.testing.assert_allclose(n['weight'][:, 0], [1.0, 1.0], rtol=1e-6)


def test_bias_changes_selection_not_weights():
  logits = jnp.array([[1., 0.]])                  # probs [0.731, 0.269]
  p = np_plan(R.route_top_k(logits, 1, 4))
  assert p['expert'][0, 0] == 0
  # Scores 0.731 + 0 < 0.269 + 0.5: expert 1 is picked, but its weight is its prob.
  b = np_plan(R.route_top_k(logits, 1, 4, bias=jnp.array([0., 0.5])))
  assert b['expert'][0, 0] == 1
  np.testing.assert_allclose(b['weight'][0, 0], 1 - sigmoid(1), rtol=1e-6)
  # k=2 with bias: both picked, renormalised over the unbiased probs.
  b2 = np_plan(R.route_top_k(logits, 2, 4, bias=jnp.array([0., 0.5])))
  np.testing.assert_array_equal(b2['expert'][0], [1, 0])
  np.testing.assert_allclose(b2['weight'][0], [1 - sigmoid(1), sigmoid(1)], rtol=1e-6)


def test_router_logit_gradient_flows_to_weights():
  # Weights are differentiable in the logits (through softmax), selection is not.
  g = jax.grad(lambda l: R.route_top_k(l, 1, 4).weight.sum())(jnp.array([[1., 0.]]))
  s = sigmoid(1)
  np.testing.assert_allclose(np.asarray(g), [[s * (1 - s), -s * (1 - s)]], rtol=1e-5)


@pytest.mark.parametrize('s,e,k,cf,want', [
    (8, 4, 1, 1.25, 3),     # ceil(2.5)
    (8, 4, 2, 1.0, 4),      # exactly balanced
    (6, 4, 2, 1.0, 3),      # ceil(3.0) stays 3
    (3, 8, 1, 1.0, 1),      # ceil(0.375)
    (1, 64, 1, 0.25, 1),    # tiny: at least 1
    (10, 4, 2, 2.0, 10),
    (16, 8, 1, 0.5, 1),
])
def test_capacity_formula(s, e, k, cf, want):
  assert R.capacity(s, e, k, cf) == want


@pytest.mark.parametrize('cf', [0, 0.0, -1.5])
def test_capacity_rejects_nonpositive_factor(cf):
  with pytest.raises(ValueError, match=rf'capacity_factor={cf}'):
    R.capacity(8, 4, 1, cf)


def test_k_larger_than_experts_rejected():
  with pytest.raises(ValueError, match=r'k=3'):
    R.capacity(8, 2, 3, 1.0)
  with pytest.raises(ValueError, match=r'k=3'):
    R.route_top_k(jnp.zeros((4, 2)), 3, 4)


# ----------------------------------------------------------------------------- losses

def test_load_balance_loss_balanced_is_one():
  probs = jnp.full((4, 2), 0.5)
  expert = jnp.array([[0], [1], [0], [1]])
  np.testing.assert_allclose(R.load_balance_loss(probs, expert), 1.0, rtol=1e-6)


def test_load_balance_loss_hand_case_first_column_only():
  probs = jnp.array([[.9, .1], [.8, .2], [.7, .3], [.2, .8]])
  # f = [3/4, 1/4] (first choices), P = mean probs = [0.65, 0.35]
  # loss = 2 * (0.75*0.65 + 0.25*0.35) = 1.15
  e1 = jnp.array([[0, 1], [0, 1], [0, 1], [1, 0]])
  np.testing.assert_allclose(R.load_balance_loss(probs, e1), 1.15, rtol=1e-6)
  # Second choices do not count: swapping them does not change the loss.
  e2 = jnp.array([[0, 0], [0, 0], [0, 0], [1, 1]])
  np.testing.assert_allclose(R.load_balance_loss(probs, e2), 1.15, rtol=1e-6)
  # ... while moving a first choice does: f = [1/2, 1/2] -> 2*(.325+.175) = 1.0
  e3 = jnp.array([[0, 1], [1, 0], [0, 1], [1, 0]])
  np.testing.assert_allclose(R.load_balance_loss(probs, e3), 1.0, rtol=1e-6)


def test_router_z_loss_matches_numpy_logsumexp():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(5, 7)).astype(np.float32) * 3
  logits[0, 0] = 200.0                   # a naive log(sum(exp)) overflows here
  m = logits.max(-1, keepdims=True)
  lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[:, 0]
  np.testing.assert_allclose(R.router_z_loss(jnp.asarray(logits)), np.mean(lse ** 2),
                             rtol=1e-5)


# ---------------------------------------------------------------------- expert choice

def test_expert_choice_hand_case():
  logits = jnp.array([[2., 0.], [0., 1.], [1., 0.], [0., 3.]])
  # probs[:, 0] = sigmoid([2, -1, 1, -3]) = [.881, .269, .731, .047] -> e0 keeps t0, t2
  # probs[:, 1] = [.119, .731, .269, .953]                           -> e1 keeps t3, t1
  p = np_plan(R.route_expert_choice(logits, 2))
  np.testing.assert_array_equal(p['expert'], [[0, 1]] * 4)   # choice j is expert j
  np.testing.assert_array_equal(p['kept'], [[1, 0], [0, 1], [1, 0], [0, 1]])
  # slot = rank of the token in the expert's descending order.
  np.testing.assert_array_equal(p['slot'], [[0, 3], [2, 1], [1, 2], [3, 0]])
  probs = np.asarray(jax.nn.softmax(logits))
  np.testing.assert_allclose(p['weight'], np.where(p['kept'], probs, 0), rtol=1e-6)
  np.testing.assert_array_equal(p['kept'].sum(0), [2, 2])     # exactly C per expert


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2 ** 31 - 1), s=st.sampled_from([1, 4, 9]),
       e=st.sampled_from([2, 3, 5]), c=st.integers(1, 10))
def test_expert_choice_keeps_top_c_tokens(seed, s, e, c):
  logits = np.random.default_rng(seed).normal(size=(s, e)).astype(np.float32)
  p = np_plan(R.route_expert_choice(jnp.asarray(logits), c))
  probs = np.asarray(jax.nn.softmax(jnp.asarray(logits)))
  for j in range(e):
    assert p['kept'][:, j].sum() == min(c, s)
    top = set(np.argsort(-probs[:, j], kind='stable')[:c])
    assert set(np.flatnonzero(p['kept'][:, j])) == top
    assert sorted(p['slot'][:, j]) == list(range(s))          # a permutation (ranks)


def test_expert_choice_refused_for_causal_unless_lookahead():
  with pytest.raises(ValueError, match='allow_lookahead'):
    R.check_expert_choice(causal=True, allow_lookahead=False)
  R.check_expert_choice(causal=True, allow_lookahead=True)
  R.check_expert_choice(causal=False, allow_lookahead=False)


# ---------------------------------------------------------------------------- metrics

def test_expert_load_and_max_violation():
  expert = jnp.array([[0], [0], [1], [2]])
  load = R.expert_load(R.expert_counts(expert, 4))
  np.testing.assert_allclose(load, [.5, .25, .25, 0.])
  # Only kept choices count, as fractions of kept: counts [1, 1, 1, 0] / 3.
  kept = jnp.array([[True], [False], [True], [True]])
  np.testing.assert_array_equal(R.expert_counts(expert, 4, kept), [1, 1, 1, 0])
  np.testing.assert_allclose(R.expert_load(R.expert_counts(expert, 4, kept)),
                             [1 / 3, 1 / 3, 1 / 3, 0.], rtol=1e-6)
  np.testing.assert_array_equal(R.expert_load(jnp.zeros(4)), 0.0)
  # MaxVio = max/mean - 1 = 0.5/0.25 - 1 = 1; perfectly balanced -> 0.
  np.testing.assert_allclose(R.max_violation(load), 1.0, rtol=1e-6)
  np.testing.assert_allclose(R.max_violation(jnp.full((4,), 0.25)), 0.0, atol=1e-7)


def test_dropped_fraction():
  expert = jnp.array([[0, 1], [1, 0]])
  kept = jnp.array([[True, False], [True, True]])
  np.testing.assert_allclose(
      R.dropped_fraction(R.expert_counts(expert, 2, kept), R.expert_counts(expert, 2)), 0.25)


def test_routing_metrics_from_summed_stats_equal_one_group():
  """Statistics of two halves, summed (what shards psum), give the whole group's metrics."""
  logits = jax.random.normal(jax.random.key(3), (16, 4))
  plan = R.route_top_k(logits, 2, 5)
  whole = R.routing_metrics(R.routing_stats(logits, plan))
  halves = [R.routing_stats(logits[i:i + 8], jax.tree.map(lambda a: a[i:i + 8], plan))
            for i in (0, 8)]
  summed = R.routing_metrics(jax.tree.map(lambda a, b: a + b, *halves))
  for name, value in whole.items():
    np.testing.assert_allclose(summed[name], value, rtol=1e-6, err_msg=name)
  probs = jax.nn.softmax(logits)
  np.testing.assert_allclose(whole['load_balance_loss'], R.load_balance_loss(probs, plan.expert),
                             rtol=1e-6)
  np.testing.assert_allclose(whole['dropped_fraction'], 1 - float(plan.kept.mean()), rtol=1e-6)
  np.testing.assert_allclose(whole['router_entropy'], R.router_entropy(probs), rtol=1e-6)
  ec = R.routing_metrics(R.routing_stats(logits, R.route_expert_choice(logits, 4)),
                         expert_choice=True)
  assert float(ec['load_balance_loss']) == 0.0
  np.testing.assert_allclose(ec['expert_load'], 0.25, rtol=1e-6)


def test_router_entropy():
  np.testing.assert_allclose(R.router_entropy(jnp.full((3, 4), 0.25)), math.log(4),
                             rtol=1e-6)
  np.testing.assert_allclose(R.router_entropy(jnp.eye(4)), 0.0, atol=1e-6)


def test_update_balance_bias():
  bias = jnp.array([0., .1, 0.])
  load = jnp.array([3., 1., 2.])   # mean 2: e0 over-loaded, e1 under, e2 exact
  np.testing.assert_allclose(R.update_balance_bias(bias, load, 0.01), [-.01, .11, 0.],
                             rtol=1e-6)


# ------------------------------------------------------------------ top-k properties

def ref_slots(expert):
  """Queue positions by a plain loop: all first choices (token order), then second..."""
  s, k = expert.shape
  slot = np.zeros_like(expert)
  count = {}
  for j in range(k):
    for t in range(s):
      slot[t, j] = count.get(expert[t, j], 0)
      count[expert[t, j]] = slot[t, j] + 1
  return slot


@st.composite
def routing_case(draw):
  e = draw(st.sampled_from([1, 2, 3, 4, 8]))
  return dict(seed=draw(st.integers(0, 2 ** 31 - 1)),
              s=draw(st.sampled_from([1, 3, 8, 16])), e=e,
              k=draw(st.integers(1, min(e, 3))), c=draw(st.integers(1, 12)),
              normalize=draw(st.sampled_from([None, True, False])),
              use_bias=draw(st.booleans()))


@settings(max_examples=30, deadline=None)
@given(routing_case())
def test_top_k_properties(case):
  s, e, k, c = case['s'], case['e'], case['k'], case['c']
  rng = np.random.default_rng(case['seed'])
  logits = (rng.normal(size=(s, e)) * 2).astype(np.float32)
  bias = (rng.normal(size=(e,)) * 0.1).astype(np.float32) if case['use_bias'] else None
  plan = R.route_top_k(jnp.asarray(logits), k, c, normalize_weights=case['normalize'],
                       bias=None if bias is None else jnp.asarray(bias))
  p = np_plan(plan)
  ex, w, slot, kept = p['expert'], p['weight'], p['slot'], p['kept']
  assert ex.shape == w.shape == slot.shape == kept.shape == (s, k)

  # Selection: K distinct experts per token, a true top-k of the (biased) scores.
  probs = np.asarray(jax.nn.softmax(jnp.asarray(logits)))
  scores = probs + (0 if bias is None else bias)
  for t in range(s):
    assert len(set(ex[t])) == k
    others = np.setdiff1d(np.arange(e), ex[t])
    if others.size:
      assert scores[t, ex[t]].min() >= scores[t, others].max() - 1e-6

  # Slots follow the choice-major priority exactly; kept <=> slot < C.
  np.testing.assert_array_equal(slot, ref_slots(ex))
  np.testing.assert_array_equal(kept, slot < c)
  for j in range(e):
    ks = np.sort(slot[kept & (ex == j)])
    assert ks.size <= c                                    # never over capacity
    np.testing.assert_array_equal(ks, np.arange(ks.size))  # 0..n-1, no gaps/repeats

  # Weights: dropped <=> weight == 0 and slot >= C; kept weights from unbiased probs.
  np.testing.assert_array_equal(~kept, (w == 0) & (slot >= c))
  chosen = np.take_along_axis(probs, ex, axis=-1)
  normalize = k >= 2 if case['normalize'] is None else case['normalize']
  if normalize:
    chosen = chosen / chosen.sum(-1, keepdims=True)
  np.testing.assert_allclose(w, np.where(kept, chosen, 0), rtol=1e-5, atol=1e-7)
  assert (w.sum(-1) <= 1 + 1e-6).all()


def test_sigmoid_group_limited_routing_by_hand():
  """DeepSeek-V3's rule on 4 experts in 2 groups, 1 group kept, k=2. Sigmoid scores
  [0.9, 0.1, 0.6, 0.5], selection bias [0, 0, 0, 0.3]: group sums of the two best biased
  scores are 1.0 and 1.4, so group {2, 3} is kept and experts 3 (0.8) and 2 (0.6) are
  chosen; the weights are the unbiased scores, renormalised, times 2.5."""
  p = np.array([[0.9, 0.1, 0.6, 0.5]])
  logits = jnp.asarray(np.log(p / (1 - p)), jnp.float32)
  bias = jnp.array([0, 0, 0, 0.3], jnp.float32)
  plan = sj.routing.route_top_k(logits, 2, 4, normalize_weights=True, bias=bias,
                             score='sigmoid', groups=(2, 1), scale=2.5)
  np.testing.assert_array_equal(plan.expert, [[3, 2]])
  np.testing.assert_allclose(plan.weight, [[2.5 * 0.5 / 1.1, 2.5 * 0.6 / 1.1]], rtol=1e-6)
  ungrouped = sj.routing.route_top_k(logits, 2, 4, normalize_weights=True, bias=bias,
                                  score='sigmoid')
  np.testing.assert_array_equal(ungrouped.expert, [[0, 3]])
  with pytest.raises(ValueError, match='n_group=3 must divide the 4 experts'):
    sj.routing.check_groups(4, 2, 'sigmoid', 3, 1)
