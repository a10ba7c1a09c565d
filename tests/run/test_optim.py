"""Schedules, optimisers and freeze masks (optim.py) on toy parameter trees."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hyperprompt_t5x import optim


def _toy_params():
  rng = np.random.default_rng(0)
  return {
      'token_embedder': {'embedding': jnp.asarray(rng.normal(size=(160, 8)), jnp.float32)},
      'encoder': {'layers_0': {'mlp': {'wi': {'kernel': jnp.asarray(
          rng.normal(size=(8, 136)), jnp.float32)}}}},
      'task_conditioning': {
          'prompts': jnp.asarray(rng.normal(size=(3, 4, 8)), jnp.float32),
          'hyper': {'kernel': jnp.asarray(rng.normal(size=(8, 8)), jnp.float32)},
      },
  }


@pytest.mark.parametrize('step', [0, 1, 7, 10, 11, 250])
def test_schedules_match_formulas(step):
  lr, w = 0.5, 10
  s = float(step)
  expected = {
      'constant': lr,
      'rsqrt': lr / math.sqrt(max(s, w, 1)),
      'linear_warmup_rsqrt': lr * min(1.0, s / w) / math.sqrt(max(s, w, 1)),
      'warmup_constant': lr * min(1.0, s / w),
      'cosine': (lr * s / w if s < w else
                 lr * 0.5 * (1 + math.cos(math.pi * min(s - w, 90) / 90))),
  }
  for kind, want in expected.items():
    sched = optim.make_schedule(kind, lr, warmup_steps=w, decay_steps=100)
    got = float(jax.jit(sched)(jnp.int32(step)))
    assert got == pytest.approx(want, rel=1e-5, abs=1e-8), kind


def test_rsqrt_without_warmup_is_lr_at_step_zero():
  sched = optim.make_schedule('rsqrt', 2.0, warmup_steps=0)
  assert float(sched(0)) == pytest.approx(2.0)
  assert float(sched(4)) == pytest.approx(1.0)


def test_unknown_choices_raise_listing_valid_ones():
  with pytest.raises(ValueError, match='constant.*rsqrt'):
    optim.make_schedule('exp')
  with pytest.raises(ValueError, match='adafactor, adamw'):
    optim.make_optimizer('sgd', 1e-3, params=_toy_params())
  with pytest.raises(ValueError, match='all, conditioning, prompts'):
    optim.trainable_mask(_toy_params(), 'backbone')
  with pytest.raises(ValueError, match='decay_steps'):
    optim.make_schedule('cosine', 1.0, warmup_steps=10)


def test_trainable_masks():
  p = _toy_params()
  assert all(jax.tree_util.tree_leaves(optim.trainable_mask(p, 'all')))
  m = optim.trainable_mask(p, 'conditioning')
  assert m['task_conditioning'] == {'prompts': True, 'hyper': {'kernel': True}}
  assert not m['token_embedder']['embedding'] and not m['encoder']['layers_0']['mlp']['wi']['kernel']
  m = optim.trainable_mask(p, 'prompts')
  assert m['task_conditioning'] == {'prompts': True, 'hyper': {'kernel': False}}
  backbone_only = {k: v for k, v in p.items() if k != 'task_conditioning'}
  with pytest.raises(ValueError, match='nothing to train'):
    optim.trainable_mask(backbone_only, 'conditioning')


def _quadratic_run(tx, params, steps=5):
  target = jax.tree_util.tree_map(jnp.zeros_like, params)
  loss = lambda p: sum(jnp.sum((a - b) ** 2) for a, b in zip(
      jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(target)))
  state = tx.init(params)

  @jax.jit
  def step(p, s):
    l, g = jax.value_and_grad(loss)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, l

  losses = []
  for _ in range(steps):
    params, state, l = step(params, state)
    losses.append(float(l))
  return params, state, losses


@pytest.mark.parametrize('name', ['adafactor', 'adamw'])
@pytest.mark.parametrize('freeze', ['all', 'conditioning', 'prompts'])
def test_optimizers_run_and_frozen_params_have_no_state(name, freeze):
  p0 = _toy_params()
  tx = optim.make_optimizer(name, optim.make_schedule('constant', 0.05), params=p0,
                            freeze=freeze, clip_norm=10.0, weight_decay=0.0)
  p, state, losses = _quadratic_run(tx, p0)
  assert losses[-1] < losses[0]
  mask = optim.trainable_mask(p0, freeze)
  for leaf0, leaf, m in zip(jax.tree_util.tree_leaves(p0), jax.tree_util.tree_leaves(p),
                            jax.tree_util.tree_leaves(mask)):
    if m:
      assert not np.array_equal(leaf0, leaf)
    else:
      assert np.array_equal(leaf0, leaf)  # frozen: unchanged
  # Optimizer state: count the elements tied to each parameter. The state holds
  # no element for frozen params, so it is smaller than a full-model state's.
  full = optim.make_optimizer(name, 0.05, params=p0, freeze='all').init(p0)
  n_state = sum(x.size for x in jax.tree_util.tree_leaves(state))
  n_full = sum(x.size for x in jax.tree_util.tree_leaves(full))
  if freeze == 'all':
    assert n_state == n_full
  else:
    assert n_state < n_full
    frozen_shapes = {l.shape for l, m in zip(jax.tree_util.tree_leaves(p0),
                                             jax.tree_util.tree_leaves(mask)) if not m}
    big = [x.shape for x in jax.tree_util.tree_leaves(state) if x.shape in frozen_shapes]
    assert not big, f'state leaves shaped like frozen params: {big}'


def test_adafactor_factors_large_matrices_and_matches_t5x_settings():
  p = _toy_params()
  tx = optim.make_optimizer('adafactor', 1e-3, params=p)
  state = tx.init(p)
  shapes = [x.shape for x in jax.tree_util.tree_leaves(state)]
  # [160, 8]: only one dim >= 128 -> unfactored full second moment.
  assert (160, 8) in shapes
  # [8, 136] likewise; no momentum buffer (a second [8,136] leaf would be one).
  assert shapes.count((8, 136)) == 1
  # One Adafactor step with decay 0.8 and clipping 1.0: v = g^2 at step 1, so
  # y = sign(g) (RMS 1, unclipped) and T5X's update is -lr * max(RMS(p), 1e-3) * y.
  g = jax.tree_util.tree_map(jnp.ones_like, p)
  u, _ = tx.update(g, state, p)
  prompts = p['task_conditioning']['prompts']
  np.testing.assert_allclose(u['task_conditioning']['prompts'],
                             -1e-3 * float(jnp.sqrt(jnp.mean(prompts ** 2))), rtol=1e-5)
  small = jax.tree_util.tree_map(lambda x: 1e-5 * x, p)  # RMS below epsilon2 = 1e-3
  u, _ = tx.update(g, state, small)
  np.testing.assert_allclose(u['task_conditioning']['prompts'], -1e-3 * 1e-3, rtol=1e-5)


def test_factor_rules_cover_every_logical_axis_of_every_method():
  from hyperprompt_t5x.model import network
  from hyperprompt_t5x import partitioning
  for name in partitioning.CONDITIONING_AXES:
    assert name in optim.LOGICAL_FACTOR_RULES, name
  for method in network.METHODS:
    cfg = network.T5Config.from_size('tiny', method=method, num_tasks=2)
    axes = network.param_logical_axes(cfg)
    params = network.param_shapes(cfg)
    tx = optim.make_optimizer('adafactor', 1e-3, params=params, param_axes=axes)
    jax.eval_shape(tx.init, params)  # raises on an axis without a rule


def test_factor_spec_follows_t5x_rules_and_fails_on_unknown_axes():
  spec = optim.factor_spec((768, 12, 64), ('embed', 'heads', 'kv'))
  assert spec == optim.FactorSpec((0, 1, 2), (0,), (1, 2))
  # Rank 2 without batch axes: T5X's heuristic, whatever the names say.
  assert optim.factor_spec((768, 2048), ('embed', 'mlp')).rows == (0,)
  assert optim.factor_spec((2048, 768), ('mlp', 'embed')).rows == (1,)
  assert optim.factor_spec((64, 768), ('embed', 'mlp')).rows is None
  # 'batch' axes leave the averages; row without column: unfactored.
  spec = optim.factor_spec((2, 768, 2048), ('layers', 'embed', 'mlp'))
  assert spec == optim.FactorSpec((1, 2), (1,), (2,))
  assert optim.factor_spec((8, 16, 768), ('tasks', 'prompt_len', 'embed')).rows is None
  with pytest.raises(ValueError, match="no Adafactor factor rule for logical axis 'mystery'"):
    optim.factor_spec((4, 4, 4), ('embed', 'mystery', 'mlp'), name='a/b')
