"""Packed rows (seqio segment ids and positions, one task per row) equal unpacked examples.

For every method, examples of several lengths from three tasks are run one per
row (unpacked) and several per row (packed, seqio's layout): the per-token
logits and the per-example losses agree, a segment cannot see another one,
and the network reads the positions where it needs them (prompt-tuning slots).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hyperprompt_t5x.model import layers
from hyperprompt_t5x.model import models
from hyperprompt_t5x.model import network

PROMPT_LEN = 3
NUM_TASKS = 3
# (task, input length, target length incl. EOS) per example.
EXAMPLES = ((0, 4, 3), (0, 2, 2), (0, 5, 4), (1, 3, 1), (1, 6, 3), (2, 1, 2), (2, 4, 4))
# Packed rows: one task per row; row 1 is only partly filled; rows of all tasks.
ROWS = ((0, 1), (2,), (3, 4), (5, 6))
PACKED_LENGTHS = (18, 8)  # (inputs, targets) per packed row
METHODS = ('global', 'share', 'sep', 'prompt_tuning', 'hyperformer', 'none')


def _config(method, **overrides):
  # Decoder prompts on (and cross-attention prompts for global/share: every prompted block).
  cross = method in ('global', 'share')
  return network.T5Config.from_size(
      'tiny', method=method, num_tasks=NUM_TASKS, dtype=jnp.float32, dropout_rate=0.0,
      prompt_length=PROMPT_LEN, bottleneck=4, task_embed_dim=4, layer_task_dim=5,
      adapter_dim=4, prompt_decoder=True, prompt_cross_attention=cross, **overrides)


def _examples(seed=0):
  rng = np.random.RandomState(seed)
  out = []
  for task, n_in, n_tgt in EXAMPLES:
    inputs = rng.randint(2, 64, n_in).astype(np.int32)
    targets = np.append(rng.randint(2, 64, n_tgt - 1), 1).astype(np.int32)  # EOS = 1
    out.append((task, inputs, targets))
  return out


def _shift_right(targets):
  return np.concatenate([[0], targets[:-1]]).astype(np.int32)


def unpacked_batch(examples):
  """One example per row, padded with 0 (the existing path)."""
  n = len(examples)
  li = max(len(x) for _, x, _ in examples)
  lt = max(len(y) for _, _, y in examples)
  batch = {k: np.zeros((n, lt), np.int32) for k in
           ('decoder_input_tokens', 'decoder_target_tokens', 'decoder_loss_weights')}
  batch['encoder_input_tokens'] = np.zeros((n, li), np.int32)
  batch['task_ids'] = np.array([t for t, _, _ in examples], np.int32)
  for i, (_, x, y) in enumerate(examples):
    batch['encoder_input_tokens'][i, :len(x)] = x
    batch['decoder_target_tokens'][i, :len(y)] = y
    batch['decoder_input_tokens'][i, :len(y)] = _shift_right(y)
    batch['decoder_loss_weights'][i, :len(y)] = 1
  return batch


def packed_batch(examples, rows, lengths, prompt_slots=0):
  """seqio's packed layout (EncDecFeatureConverter(pack=True)), one task per row.

  prompt_slots > 0: each encoder segment starts with that many reserved
  positions (token 0) for packed prompt tuning. Also returns, per example,
  (row, start of its targets).
  """
  li, lt = lengths
  n = len(rows)
  batch = {k: np.zeros((n, li), np.int32) for k in
           ('encoder_input_tokens', 'encoder_segment_ids', 'encoder_positions')}
  batch.update({k: np.zeros((n, lt), np.int32) for k in
                ('decoder_input_tokens', 'decoder_target_tokens', 'decoder_loss_weights',
                 'decoder_segment_ids', 'decoder_positions')})
  batch['task_ids'] = np.zeros((n,), np.int32)
  where = {}
  for r, members in enumerate(rows):
    tasks = {examples[i][0] for i in members}
    assert len(tasks) == 1, 'a packed row holds one task'
    batch['task_ids'][r] = tasks.pop()
    e = t = 0
    for s, i in enumerate(members, start=1):
      _, x, y = examples[i]
      x = np.concatenate([np.zeros(prompt_slots, np.int32), x])
      batch['encoder_input_tokens'][r, e:e + len(x)] = x
      batch['encoder_segment_ids'][r, e:e + len(x)] = s
      batch['encoder_positions'][r, e:e + len(x)] = np.arange(len(x))
      batch['decoder_target_tokens'][r, t:t + len(y)] = y
      batch['decoder_input_tokens'][r, t:t + len(y)] = _shift_right(y)
      batch['decoder_loss_weights'][r, t:t + len(y)] = 1
      batch['decoder_segment_ids'][r, t:t + len(y)] = s
      batch['decoder_positions'][r, t:t + len(y)] = np.arange(len(y))
      where[i] = (r, t)
      e, t = e + len(x), t + len(y)
    assert e <= li and t <= lt
  return batch, where


@functools.lru_cache(maxsize=None)
def _setup(method):
  config = _config(method)
  return config, models.EncoderDecoderModel(config, z_loss=1e-4), network.random_params(config)


@functools.partial(jax.jit, static_argnums=0)
def _logits(config, params, batch):
  return network.Transformer(config).apply(
      {'params': params}, batch['encoder_input_tokens'], batch['decoder_input_tokens'],
      batch['decoder_target_tokens'], batch['task_ids'], **models.packing_features(batch),
      enable_dropout=False)


def _token_losses(model, logits, batch):
  total, _ = models.cross_entropy_with_z_loss(logits, batch['decoder_target_tokens'],
                                              model.z_loss)
  return total * batch['decoder_loss_weights']


@pytest.mark.parametrize('method', METHODS)
def test_packed_rows_equal_unpacked_examples(method):
  config, model, params = _setup(method)
  examples = _examples()
  slots = PROMPT_LEN if method == 'prompt_tuning' else 0
  unpacked = unpacked_batch(examples)
  packed, where = packed_batch(examples, ROWS, PACKED_LENGTHS, slots)
  logits_u = np.asarray(_logits(config, params, unpacked))
  logits_p = np.asarray(_logits(config, params, packed))
  for i, (_, _, y) in enumerate(examples):
    r, t = where[i]
    np.testing.assert_allclose(logits_p[r, t:t + len(y)], logits_u[i, :len(y)],
                               rtol=1e-5, atol=1e-5, err_msg=f'{method}: example {i}')

  # Per-example losses: token losses summed per segment vs per unpacked row.
  num_segments = max(len(m) for m in ROWS)
  per_segment = np.asarray(models.sum_per_segment(
      _token_losses(model, jnp.asarray(logits_p), packed), packed['decoder_segment_ids'],
      num_segments))
  per_row = np.asarray(jnp.sum(_token_losses(model, jnp.asarray(logits_u), unpacked), -1))
  for i in range(len(examples)):
    r, _ = where[i]
    s = ROWS[r].index(i)
    np.testing.assert_allclose(per_segment[r, s], per_row[i], rtol=1e-5,
                               err_msg=f'{method}: example {i}')

  # The batch loss (weighted token mean) and token count through the model's loss_fn.
  loss_u, metrics_u = model.loss_fn(params, unpacked, None)
  loss_p, metrics_p = model.loss_fn(params, packed, None)
  assert float(metrics_p['num_tokens']) == float(metrics_u['num_tokens'])
  np.testing.assert_allclose(float(loss_p), float(loss_u), rtol=1e-5)


@pytest.mark.parametrize('method', ('global', 'prompt_tuning'))
def test_a_segment_cannot_see_another(method):
  """Changing segment 2 of a row (inputs and targets) leaves segment 1's logits as they were."""
  config, _, params = _setup(method)
  examples = _examples()
  slots = PROMPT_LEN if method == 'prompt_tuning' else 0
  packed, where = packed_batch(examples, ROWS, PACKED_LENGTHS, slots)
  other = list(examples)
  task, x, y = other[1]  # segment 2 of row 0
  other[1] = (task, (x * 7) % 62 + 2, np.append((y[:-1] * 5) % 62 + 2, 1).astype(np.int32))
  perturbed, _ = packed_batch(other, ROWS, PACKED_LENGTHS, slots)
  base = np.asarray(_logits(config, params, packed))
  changed = np.asarray(_logits(config, params, perturbed))
  n0 = len(examples[0][2])
  np.testing.assert_allclose(changed[0, :n0], base[0, :n0], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(changed[1:], base[1:], rtol=1e-6, atol=1e-6)
  # ... while segment 2 itself does change (the perturbation is seen where it belongs).
  _, t = where[1]
  assert np.abs(changed[0, t:t + len(y)] - base[0, t:t + len(y)]).max() > 1e-3


def test_logits_do_not_depend_on_where_a_segment_starts():
  """Relative positions restart per segment: an example alone, or after others, scores alike."""
  config, _, params = _setup('global')
  examples = _examples()
  alone, where_alone = packed_batch(examples, ((2,),), PACKED_LENGTHS)
  after, where_after = packed_batch(examples, ((0, 1, 2),), (18, 12))
  y = examples[2][2]
  _, t = where_after[2]
  assert t > 0
  np.testing.assert_allclose(np.asarray(_logits(config, params, after))[0, t:t + len(y)],
                             np.asarray(_logits(config, params, alone))[0, :len(y)],
                             rtol=1e-5, atol=1e-5)


def test_packed_prompt_tuning_reads_the_positions():
  """The prompt slots are found from the positions: positions that do not restart at a
  segment leave its slots without prompts, and its logits change."""
  config, _, params = _setup('prompt_tuning')
  packed, where = packed_batch(_examples(), ROWS, PACKED_LENGTHS, PROMPT_LEN)
  wrong = dict(packed)
  positions = packed['encoder_positions'].copy()
  second = packed['encoder_segment_ids'][0] == 2
  positions[0, second] = np.arange(second.sum()) + PROMPT_LEN + 4
  wrong['encoder_positions'] = positions
  base = np.asarray(_logits(config, params, packed))
  changed = np.asarray(_logits(config, params, wrong))
  _, t = where[1]
  assert np.abs(changed[0, t:] - base[0, t:]).max() > 1e-3
  np.testing.assert_allclose(changed[0, :t], base[0, :t], rtol=1e-6, atol=1e-6)


def test_segment_mask_is_block_diagonal_and_causal():
  segments = jnp.array([[1, 1, 2, 2, 2, 0]])
  targets = jnp.array([[5, 1, 6, 7, 1, 0]])
  mask = np.asarray(layers.make_decoder_mask(targets, jnp.float32, segments))[0, 0]
  expected = np.array([[1, 0, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0, 0],
                       [0, 0, 1, 0, 0, 0],
                       [0, 0, 1, 1, 0, 0],
                       [0, 0, 1, 1, 1, 0],
                       [0, 0, 0, 0, 0, 0]], np.float32)
  np.testing.assert_array_equal(mask, expected)
  assert layers.make_segment_mask(None, None) is None


def test_bad_packing_features_get_one_clear_error():
  config, model, params = _setup('prompt_tuning')
  packed, _ = packed_batch(_examples(), ROWS, PACKED_LENGTHS, PROMPT_LEN)
  with pytest.raises(ValueError, match='given together'):
    model.loss_fn(params, {k: v for k, v in packed.items() if k != 'decoder_segment_ids'},
                  None)
  with pytest.raises(ValueError, match='needs encoder_positions'):
    model.loss_fn(params, {k: v for k, v in packed.items() if k != 'encoder_positions'}, None)
  with pytest.raises(ValueError, match='encoder_segment_ids has shape'):
    model.loss_fn(params, dict(packed, encoder_segment_ids=packed['encoder_segment_ids'][:, 1:]),
                  None)
  with pytest.raises(ValueError, match='unpacked'):
    model.predict_batch(params, packed)
