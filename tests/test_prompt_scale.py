"""Prompt/real key-value norm ratios on the real T5X checkpoint, before and after calibration."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hyperprompt_t5x import checkpoints
from hyperprompt_t5x import network
from hyperprompt_t5x import prompt_scale
from hyperprompt_t5x import t5x_checkpoint


def _batch(vocab):
  rng = np.random.default_rng(0)
  enc = rng.integers(2, vocab, (6, 20)).astype(np.int32)
  enc[:3, 14:] = 0
  tgt = rng.integers(2, vocab, (6, 5)).astype(np.int32)
  tgt[0, 3:] = 0
  return {'encoder_input_tokens': enc, 'decoder_target_tokens': tgt,
          'decoder_input_tokens': np.pad(tgt[:, :-1], ((0, 0), (1, 0))),
          'task_ids': np.arange(6, dtype=np.int32) % 3}


@pytest.mark.parametrize('method,flags', [('share', dict(prompt_cross_attention=True)),
                                          ('sep', {}), ('global', {})])
def test_ratios_on_the_t5x_checkpoint_are_one_after_calibration(method, flags,
                                                                t5x_tiny_checkpoint):
  pretrained = t5x_checkpoint.load_t5x_params(str(t5x_tiny_checkpoint))
  cfg = t5x_checkpoint.t5x_config_from_params(
      pretrained, method=method, num_tasks=3, dtype=jnp.float32, dropout_rate=0.0,
      prompt_length=4, bottleneck=8, **flags)
  params = checkpoints.merge_backbone(network.random_params(cfg, seed=1), pretrained)
  batch = _batch(cfg.vocab_size)

  @jax.jit
  def run(params):
    before = prompt_scale.norm_ratios(cfg, params, batch)
    calibrated = prompt_scale.calibrate(cfg, params, before)
    return before, prompt_scale.norm_ratios(cfg, calibrated, batch), calibrated

  before, after, calibrated = jax.device_get(run(params))
  kinds = ['encoder', 'decoder'] + (['cross'] if flags else [])
  assert sorted(before) == sorted(kinds)
  for kind in kinds:
    for name in ('key', 'value'):
      b, a = np.asarray(before[kind][name]), np.asarray(after[kind][name])
      assert b.shape == (2,) and np.all((b > 0.2) & (b < 5)), (kind, name, b)
      if method == 'global':  # one hypernetwork for all blocks: the mean is 1
        assert np.all((a > 0.5) & (a < 2)), (kind, name, a)
      else:
        # Exact at layer 0; a later layer's real k/v move a little with the earlier prompts.
        np.testing.assert_allclose(a, 1.0, rtol=5e-2, err_msg=f'{kind} {name}')
  if method == 'global':
    for name in ('key', 'value'):
      np.testing.assert_allclose(np.mean(prompt_scale.per_block(after, name)), 1.0, rtol=5e-2)
  # Only the up-projections changed; the backbone is untouched.
  flat_a, flat_b = checkpoints.flatten_params(params), checkpoints.flatten_params(calibrated)
  changed = sorted(k for k in flat_a if not np.array_equal(flat_a[k], flat_b[k]))
  assert changed and all('_up' in k for k in changed), changed
