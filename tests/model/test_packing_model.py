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


def _logits(config, params, batch):
  return _forward(config.method, params, batch)[0]


@functools.partial(jax.jit, static_argnums=0)
def _forward(method, params, batch):
  """(logits, weighted token losses, loss_fn's loss and num_tokens): one compile per shape."""
  config, model, _ = _setup(method)
  logits = network.Transformer(config).apply(
      {'params': params}, batch['encoder_input_tokens'], batch['decoder_input_tokens'],
      batch['decoder_target_tokens'], batch['task_ids'], **models.packing_features(batch),
      enable_dropout=False)
  total, _ = models.cross_entropy_with_z_loss(logits, batch['decoder_target_tokens'],
                                              model.z_loss)
  loss, metrics = model.loss_fn(params, batch, None)
  return logits, total * batch['decoder_loss_weights'], loss, metrics['num_tokens']


@pytest.mark.parametrize('method', METHODS)
def test_packed_rows_equal_unpacked_examples(method):
  _, _, params = _setup(method)
  examples = _examples()
  slots = PROMPT_LEN if method == 'prompt_tuning' else 0
  unpacked = unpacked_batch(examples)
  packed, where = packed_batch(examples, ROWS, PACKED_LENGTHS, slots)
  logits_u, tokens_u, loss_u, num_u = jax.device_get(_forward(method, params, unpacked))
  logits_p, tokens_p, loss_p, num_p = jax.device_get(_forward(method, params, packed))
  for i, (_, _, y) in enumerate(examples):
    r, t = where[i]
    np.testing.assert_allclose(logits_p[r, t:t + len(y)], logits_u[i, :len(y)],
                               rtol=1e-5, atol=1e-5, err_msg=f'{method}: example {i}')

  # Per-example losses: token losses summed per segment vs per unpacked row.
  num_segments = max(len(m) for m in ROWS)
  per_segment = np.asarray(models.sum_per_segment(
      jnp.asarray(tokens_p), packed['decoder_segment_ids'], num_segments))
  per_row = tokens_u.sum(-1)
  for i in range(len(examples)):
    r, _ = where[i]
    s = ROWS[r].index(i)
    np.testing.assert_allclose(per_segment[r, s], per_row[i], rtol=1e-5,
                               err_msg=f'{method}: example {i}')

  # The batch loss (weighted token mean) and token count through the model's loss_fn.
  assert num_p == num_u == sum(len(y) for _, _, y in examples)
  np.testing.assert_allclose(loss_p, loss_u, rtol=1e-5)


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
  unreserved, _ = packed_batch(_examples(), ROWS, PACKED_LENGTHS)  # no prompt slots
  with pytest.raises(ValueError, match=r'rows \[0, 1, 2, 3\] have tokens at positions'):
    model.loss_fn(params, unreserved, None)


def test_train_step_takes_packed_batches():
  """One SGD step on the packed batch moves the parameters as on the unpacked one (same
  tokens, same weighted mean); the ahead-of-time batch_spec describes the packed batch."""
  import optax
  from hyperprompt_t5x import partitioning
  from hyperprompt_t5x.run import train_state
  from hyperprompt_t5x.training import step_compilation
  config = _config('global', num_encoder_layers=1, num_decoder_layers=1)
  model = models.EncoderDecoderModel(config, z_loss=1e-4)
  mesh = partitioning.make_mesh(1)
  tx = optax.sgd(0.5)
  state, shardings = train_state.create_train_state(
      model, tx, jax.random.PRNGKey(0), mesh, partitioning.standard_logical_axis_rules(),
      PACKED_LENGTHS[0], PACKED_LENGTHS[1], initial_params=network.random_params(config))
  step = train_state.make_train_step(model, tx, mesh, shardings, donate=False)
  examples = _examples()
  packed, _ = packed_batch(examples, ROWS, PACKED_LENGTHS)
  spec = step_compilation.batch_spec(mesh, len(ROWS), {'inputs': PACKED_LENGTHS[0],
                                                       'targets': PACKED_LENGTHS[1]}, packed=True)
  assert {k: v.shape for k, v in spec.items()} == {k: v.shape for k, v in packed.items()}
  step.jitted.lower(train_state.abstract_with_shardings(state, shardings), spec,
                    jax.random.PRNGKey(0))
  results = {}
  for name, batch in (('unpacked', unpacked_batch(examples)), ('packed', packed)):
    new_state, metrics = step(state, partitioning.shard_batch(batch, mesh))
    results[name] = (jax.device_get(new_state.params), float(metrics['loss']))
  (params_u, loss_u), (params_p, loss_p) = results['unpacked'], results['packed']
  np.testing.assert_allclose(loss_p, loss_u, rtol=1e-5)
  for got, want in zip(jax.tree_util.tree_leaves(params_p), jax.tree_util.tree_leaves(params_u)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  moved = jax.tree_util.tree_leaves(jax.tree_util.tree_map(
      lambda a, b: float(np.max(np.abs(a - b))), params_p, jax.device_get(state.params)))
  assert max(moved) > 1e-3


def test_t5x_model_passes_the_packing_features():
  """T5X's loss on a packed batch (task ids [batch, 1]) is the project model's on the same
  examples unpacked; init takes packed input shapes; decoding refuses packed rows."""
  pytest.importorskip('t5x', reason='t5x not importable')
  import seqio
  from t5x import optimizers as t5x_optimizers
  from hyperprompt_t5x.t5x_adapter import t5x_model

  def _t5x(config):
    vocab = seqio.PassThroughVocabulary(config.vocab_size, eos_id=1)  # ids = the model's rows
    return t5x_model.HyperPromptEncoderDecoderModel(
        network.Transformer(config), vocab, vocab, t5x_optimizers.sgd(0.1), z_loss=1e-4,
        loss_normalizing_factor='NUM_REAL_TARGET_TOKENS')
  config, _, params = _setup('global')
  theirs = _t5x(config)
  examples = _examples()
  packed, _ = packed_batch(examples, ROWS, PACKED_LENGTHS)
  packed_t5x = dict(packed, task_ids=packed['task_ids'][:, None])
  loss = jax.jit(lambda p, b: theirs.loss_fn(p, b, None)[0])(params, packed_t5x)
  want = _forward('global', params, unpacked_batch(examples))[2]
  np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)

  shapes = {k: v.shape for k, v in packed.items() if k != 'task_ids'}
  for method in ('global', 'prompt_tuning'):  # traced, as T5X inits
    t5x_init = _t5x(_config(method)).get_initial_variables
    variables = jax.eval_shape(lambda rng, f=t5x_init: f(rng, shapes), jax.random.PRNGKey(0))
    assert (jax.tree_util.tree_map(lambda x: x.shape, dict(variables['params'])) ==
            jax.tree_util.tree_map(lambda x: x.shape, network.param_shapes(_config(method))))
  with pytest.raises(ValueError, match='unpacked'):
    theirs.predict_batch_with_aux(params, packed_t5x)


def test_the_packed_layout_is_seqios():
  """The packer of these tests lays rows out as seqio's EncDecFeatureConverter(pack=True)."""
  seqio = pytest.importorskip('seqio', reason='seqio not importable')
  tf = pytest.importorskip('tensorflow', reason='tensorflow not importable')
  examples = _examples()
  members = ROWS[0] + ROWS[1]  # task 0's stream: examples 0, 1 fill one row, 2 the next
  ds = tf.data.Dataset.from_generator(
      lambda: ({'inputs': examples[i][1], 'targets': examples[i][2]} for i in members),
      output_signature={'inputs': tf.TensorSpec([None], tf.int32),
                        'targets': tf.TensorSpec([None], tf.int32)})
  lengths = (9, 5)  # example 2 does not fit after 0 and 1
  rows = list(seqio.EncDecFeatureConverter(pack=True)(
      ds, {'inputs': lengths[0], 'targets': lengths[1]}).as_numpy_iterator())
  ours, _ = packed_batch(examples, ROWS[:2], lengths)
  assert len(rows) == 2
  for key, value in ours.items():
    if key != 'task_ids':
      np.testing.assert_array_equal(np.stack([r[key] for r in rows]), value, err_msg=key)
