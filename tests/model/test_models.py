"""Loss, scores and axes of EncoderDecoderModel (models.py) against numpy references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from hyperprompt_t5x.model import models
import step_helpers  # tests/ is on sys.path under pytest (rootdir conftest)


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_reference_loss(logits, targets, weights, z_loss, ls, normalizer=None):
  """T5X's definition, written out with a one-hot soft-target matrix."""
  logits = logits.astype(np.float64)
  v = logits.shape[-1]
  conf, low = 1.0 - ls, ls / (v - 1)
  soft = np.full(logits.shape, low)
  np.put_along_axis(soft, targets[..., None], conf, axis=-1)
  log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  ce = -(soft * (logits - log_z[..., None])).sum(-1)
  const = -(conf * np.log(conf) + (v - 1) * low * np.log(low + 1e-20))
  per_token = ce + z_loss * log_z ** 2 - const
  norm = weights.sum() if normalizer is None else normalizer
  return (per_token * weights).sum() / norm, (z_loss * log_z ** 2 * weights).sum() / norm


@pytest.mark.parametrize('ls,z', [(0.0, 0.0), (0.1, 1e-2), (0.3, 1e-4)])
def test_cross_entropy_matches_numpy_reference(ls, z):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 5, 11)).astype(np.float32) * 3
  targets = rng.integers(0, 11, (3, 5))
  # bf16 logits (the network's activation dtype) are upcast inside.
  total, _ = models.cross_entropy_with_z_loss(jnp.asarray(logits, jnp.bfloat16), targets,
                                              z, ls)
  assert total.dtype == jnp.float32
  ones = np.ones((3, 5))
  ref_loss, ref_z = _np_reference_loss(logits, targets, ones, z, ls)
  np.testing.assert_allclose(float(jnp.mean(total)), ref_loss, rtol=1e-2)  # bf16 input
  total32, zl32 = models.cross_entropy_with_z_loss(jnp.asarray(logits), targets, z, ls)
  np.testing.assert_allclose(float(jnp.mean(total32)), ref_loss, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(jnp.mean(zl32)), ref_z, rtol=1e-5, atol=1e-8)
  assert total32.dtype == jnp.float32


def test_perfect_model_with_label_smoothing_scores_near_zero():
  # Logits whose softmax equals the smoothed targets give loss 0 (T5X's constant).
  v, ls = 7, 0.2
  targets = np.array([[1, 4]])
  soft = np.full((1, 2, v), ls / (v - 1))
  np.put_along_axis(soft, targets[..., None], 1 - ls, axis=-1)
  total, _ = models.cross_entropy_with_z_loss(jnp.log(jnp.asarray(soft, jnp.float32)),
                                              targets, 0.0, ls)
  np.testing.assert_allclose(total, 0.0, atol=1e-5)


def _model_with_fixed_logits(monkeypatch, logits, **kwargs):
  model = models.EncoderDecoderModel(step_helpers.tiny_config('global'), **kwargs)
  monkeypatch.setattr(model, '_logits', lambda params, batch, rng: jnp.asarray(logits))
  return model


def test_loss_fn_weights_normalisation_and_metrics(monkeypatch):
  batch = step_helpers.make_batch(1, batch=4, vocab=13)
  rng = np.random.default_rng(2)
  logits = rng.normal(size=batch['decoder_target_tokens'].shape + (13,)).astype(np.float32)
  targets, weights = batch['decoder_target_tokens'], batch['decoder_loss_weights']
  assert 0 < weights.sum() < weights.size  # some padding to ignore
  model = _model_with_fixed_logits(monkeypatch, logits, z_loss=1e-3, label_smoothing=0.1)
  loss, metrics = model.loss_fn(None, batch, None)
  ref, ref_z = _np_reference_loss(logits, targets, weights, 1e-3, 0.1)
  np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
  np.testing.assert_allclose(float(metrics['z_loss']), ref_z, rtol=1e-5)
  np.testing.assert_allclose(float(metrics['cross_ent_loss']), ref - ref_z, rtol=1e-5)
  assert float(metrics['num_tokens']) == weights.sum()
  acc = ((logits.argmax(-1) == targets) * weights).sum() / weights.sum()
  np.testing.assert_allclose(float(metrics['accuracy']), acc, rtol=1e-6)
  # A fixed normaliser (T5X's loss_normalizing_factor) replaces the token count.
  model = _model_with_fixed_logits(monkeypatch, logits, z_loss=1e-3, label_smoothing=0.1,
                                   loss_normalizing_factor=100.0)
  loss, _ = model.loss_fn(None, batch, None)
  ref, _ = _np_reference_loss(logits, targets, weights, 1e-3, 0.1, normalizer=100.0)
  np.testing.assert_allclose(float(loss), ref, rtol=1e-5)


def test_score_batch_is_weighted_sum_log_likelihood(monkeypatch):
  batch = step_helpers.make_batch(3, batch=4, vocab=13)
  logits = np.random.default_rng(4).normal(
      size=batch['decoder_target_tokens'].shape + (13,)).astype(np.float32)
  model = _model_with_fixed_logits(monkeypatch, logits, z_loss=1.0, label_smoothing=0.2)
  scores = model.score_batch(None, batch)
  ll = np.take_along_axis(_np_log_softmax(logits.astype(np.float64)),
                          batch['decoder_target_tokens'][..., None], -1)[..., 0]
  ref = (ll * batch['decoder_loss_weights']).sum(-1)
  assert scores.shape == (4,) and scores.dtype == jnp.float32
  np.testing.assert_allclose(scores, ref, rtol=1e-5)


def test_bad_settings_raise():
  cfg = step_helpers.tiny_config('global')
  with pytest.raises(ValueError, match='label_smoothing'):
    models.EncoderDecoderModel(cfg, label_smoothing=1.0)
  with pytest.raises(ValueError, match='loss_normalizing_factor'):
    models.EncoderDecoderModel(cfg, loss_normalizing_factor=0.0)


def test_logical_axes_cover_every_param_with_t5x_names():
  model = models.EncoderDecoderModel(step_helpers.tiny_config('global'))
  shapes = model.init_abstract(1, 8, 4)['params']
  axes = model.logical_axes(8, 4)
  assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(
      axes, is_leaf=lambda x: isinstance(x, P))
  assert axes['token_embedder']['embedding'] == P('vocab', 'embed')
  assert axes['encoder']['layers_0']['mlp']['wi_0']['kernel'] == P('embed', 'mlp')
  assert axes['decoder']['logits_dense']['kernel'] == P('embed', 'vocab')
  assert axes['task_conditioning']['prompts'] == P('tasks', 'prompt_len', 'embed')
  for path, spec in jax.tree_util.tree_flatten_with_path(
      axes, is_leaf=lambda x: isinstance(x, P))[0]:
    shape = shapes
    for k in path:
      shape = shape[k.key]
    assert len(spec) == len(shape.shape), (path, spec, shape)
