"""The default optimizer against the real `t5x.adafactor.Adafactor`, update for update.

A small tree shaped like the model's leaf kinds (2-D kernels factored by T5X's
heuristic, 3-D [embed, heads, kv] kernels factored by logical axes, a scanned
'layers' kernel, 1-D scales, embeddings, every task-conditioning leaf kind),
several steps with fresh gradients each, parameters of a pretrained scale.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from hyperprompt_t5x.checkpoints import pretrained
from hyperprompt_t5x import optim
from hyperprompt_t5x.checkpoints.t5x_format import unflatten_params

LR = 1e-3
STEPS = 4

# name -> (shape, logical axes); dims >= 128 where T5X factors.
LEAVES = {
    'token_embedder/embedding': ((512, 160), ('vocab', 'embed')),
    'encoder/layers_0/attention/query/kernel': ((160, 4, 40), ('embed', 'heads', 'kv')),
    'encoder/layers_0/attention/out/kernel': ((4, 40, 160), ('heads', 'kv', 'embed')),
    'encoder/layers_0/mlp/wi_0/kernel': ((160, 256), ('embed', 'mlp')),
    'encoder/layers_0/mlp/wo/kernel': ((256, 160), ('mlp', 'embed')),
    'encoder/layers_0/self/kernel': ((160, 160), ('embed', 'joined_kv')),
    'encoder/layers_0/pre_attention_layer_norm/scale': ((160,), ('embed',)),
    'encoder/relpos_bias/rel_embedding': ((4, 32), ('heads', 'relpos_buckets')),
    'encoder/scanned/kernel': ((2, 160, 256), ('layers', 'embed', 'mlp')),
    'decoder/logits_dense/kernel': ((160, 512), ('embed', 'vocab')),
    'task_conditioning/prompts': ((3, 8, 160), ('tasks', 'prompt_len', 'embed')),
    'task_conditioning/key_down': ((4, 160, 16), ('hyper_blocks', 'embed', 'hyper_bottleneck')),
    'task_conditioning/key_up': ((3, 4, 16, 160),
                                 ('tasks', 'hyper_blocks', 'hyper_bottleneck', 'joined_kv')),
    'task_conditioning/task_embedding': ((3, 32), ('tasks', 'task_embed')),
    'task_conditioning/hyper_key_down/kernel': ((32, 640), ('layer_task', 'hyper_generated')),
    'task_conditioning/layer_task_out/bias': ((32,), ('layer_task',)),
}


def _tree(seed, scale_of):
  rng = np.random.default_rng(seed)
  return unflatten_params({n: jnp.asarray(scale_of(n) * rng.standard_normal(shape), jnp.float32)
                           for n, (shape, _) in LEAVES.items()})


def _params():
  # Pretrained-like scales: kernels ~0.05, scales ~1, some leaves below epsilon2.
  scales = {'scale': 1.0, 'bias': 1e-4, 'rel_embedding': 0.5}
  return _tree(0, lambda n: scales.get(n.rsplit('/', 1)[-1], 0.05))


def _grads(step):
  # A different magnitude per leaf and step; one leaf all zeros at step 1.
  rng = np.random.default_rng(100 + step)
  mags = {n: float(10.0 ** rng.uniform(-4, 0)) for n in LEAVES}
  grads = _tree(1000 + step, lambda n: mags[n])
  if step == 1:
    grads['encoder']['layers_0']['pre_attention_layer_norm']['scale'] *= 0.0
  return grads


AXES = unflatten_params({n: P(*axes) for n, (_, axes) in LEAVES.items()})


@pytest.fixture(scope='module')
def t5x_run():
  """T5X's parameters after each step and its final state (run once per module)."""
  try:
    from t5x import adafactor  # pylint: disable=g-import-not-at-top
  except ImportError:
    pytest.skip('t5x not importable')
  return _run_t5x(adafactor, _params())


def _run_t5x(adafactor, params):
  """[(params, state)] after each of STEPS steps of T5X's Adafactor."""
  opt = adafactor.Adafactor(learning_rate=LR, logical_factor_rules=optim.LOGICAL_FACTOR_RULES)
  opt.set_param_axes(AXES)
  state = opt.init_state(params)
  apply = jax.jit(lambda p, s, g: opt.apply_gradient(opt.hyper_params, p, s, g))
  out = []
  for step in range(STEPS):
    params, state = apply(params, state, _grads(step))
    out.append((params, state))
  return out


def _our_step(**kw):
  tx = optim.make_optimizer('adafactor', LR, params=_params(), param_axes=AXES, **kw)

  @jax.jit
  def apply(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s
  return tx, apply


def _run_ours(params, **kw):
  tx, apply = _our_step(**kw)
  state = tx.init(params)
  out = []
  for step in range(STEPS):
    params, state = apply(params, state, _grads(step))
    out.append((params, state))
  return out


def _max_diffs(ours, theirs, before):
  """(max abs parameter difference, max difference in float32 spacings of the parameter)."""
  abs_diff, ulps = 0.0, 0.0
  for a, b, p in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs),
                     jax.tree_util.tree_leaves(before)):
    a, b, p = np.asarray(a), np.asarray(b), np.asarray(p)
    d = np.abs(a - b)
    abs_diff = max(abs_diff, float(d.max()))
    spacing = np.spacing(np.maximum(np.maximum(np.abs(a), np.abs(b)), np.abs(p)))
    ulps = max(ulps, float((d / spacing).max()))
  return abs_diff, ulps


def test_each_step_equals_t5x_from_the_same_state(t5x_run):
  """From T5X's parameters and state (restored into ours) one step of each agrees."""
  tx, apply = _our_step()
  params, t5x_state = _params(), None
  for step in range(STEPS):
    state = tx.init(params)
    if t5x_state is not None:
      saved = pretrained.adafactor_state_from_t5x(t5x_state)
      state, restored, fresh = optim.restore_adafactor_state(
          state, saved.step, saved.param_states, skip_prefix=None)
      assert len(restored) == len(LEAVES) and not fresh
    ours, _ = apply(params, state, _grads(step))
    theirs, t5x_state = t5x_run[step]
    # Both compute p - lr * scale * y in float32, multiplying in another order:
    # the new parameters differ by at most two float32 spacings of the parameter.
    abs_diff, ulps = _max_diffs(ours, theirs, params)
    assert ulps <= 2.0, (step, abs_diff, ulps)
    params = theirs


def test_default_adafactor_follows_t5x_over_steps(t5x_run):
  ours = _run_ours(_params())
  for step, ((p, _), (q, _)) in enumerate(zip(ours, t5x_run)):
    abs_diff, _ = _max_diffs(p, q, q)
    assert abs_diff < 1e-7, (step, abs_diff)  # parameters are ~0.05..1
  # The state is T5X's, slot for slot (what a checkpoint restore relies on).
  our_state, t5x_state = ours[-1][1][0], t5x_run[-1][1]
  assert int(our_state.count) == int(t5x_state.step) == STEPS
  flat = optim.flatten_t5x_param_states(our_state)
  theirs = pretrained.adafactor_state_from_t5x(t5x_state).param_states
  assert sorted(flat) == sorted(theirs)
  for name, slots in flat.items():
    for slot, value in slots.items():
      want = theirs[name][slot]
      assert value.shape == want.shape, (name, slot)
      np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-30, err_msg=f'{name} {slot}')
  # The 3-D kernel is factored by its axes (embed rows vs heads x kv columns).
  q = flat['encoder/layers_0/attention/query/kernel']
  assert q['v_row'].shape == (160,) and q['v_col'].shape == (4, 40) and q['v'].shape == (1,)


def test_without_parameter_scale_the_update_differs_from_t5x(t5x_run):
  """The check can fail: without the parameter scale the update is far from T5X's."""
  p0 = _params()
  (ours, _), = _run_ours(p0, multiply_by_parameter_scale=False)[:1]
  theirs, _ = t5x_run[0]
  _, ulps = _max_diffs(ours, theirs, p0)
  assert ulps > 1e3


def test_t5x_model_uses_the_same_factor_rules(t5x_run):
  """T5X training (t5x_model) and the lean trainer factor every axis alike."""
  from t5x import adafactor  # pylint: disable=g-import-not-at-top
  from hyperprompt_t5x.t5x_adapter import t5x_model  # pylint: disable=g-import-not-at-top
  ours = {k: adafactor.factor_name_to_factordim(v) for k, v in optim.LOGICAL_FACTOR_RULES.items()}
  assert dict(t5x_model.logical_factor_rules()) == ours
