"""The T5X model class: same loss, scores and decodes as the project's model, every method."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

try:
  import t5x  # noqa: F401  pylint: disable=unused-import
except ImportError:
  pytest.skip('t5x not importable (install it with scripts/install_t5x.sh)',
              allow_module_level=True)

import seqio  # noqa: E402
from t5x import decoding as t5x_decoding  # noqa: E402
from t5x import optimizers as t5x_optimizers  # noqa: E402

from hyperprompt_t5x.model import models  # noqa: E402
from hyperprompt_t5x.model import network  # noqa: E402
from hyperprompt_t5x.training import prompt_scale  # noqa: E402
from hyperprompt_t5x.t5x_adapter import t5x_model  # noqa: E402

TARGET_LEN = 4


def _config(method):
  return network.T5Config.from_size(
      'tiny', method=method, num_tasks=3, dtype=jnp.float32, dropout_rate=0.0,
      num_encoder_layers=1, num_decoder_layers=1, prompt_length=3, bottleneck=4,
      task_embed_dim=4, layer_task_dim=5, adapter_dim=4)


def _t5x_model(config, decode_fn=t5x_decoding.beam_search):
  vocab = seqio.PassThroughVocabulary(config.vocab_size, eos_id=1)  # ids = the tiny model's rows
  return t5x_model.HyperPromptEncoderDecoderModel(
      network.Transformer(config), vocab, vocab, t5x_optimizers.sgd(0.1),
      decode_fn=decode_fn, z_loss=1e-4, loss_normalizing_factor='NUM_REAL_TARGET_TOKENS')


def _batch():
  rng = np.random.RandomState(0)
  enc = rng.randint(2, 64, (4, 7)).astype(np.int32)
  enc[:, 5:] = 0
  tgt = rng.randint(2, 64, (4, TARGET_LEN)).astype(np.int32)
  tgt[:, -1] = 1
  tgt[0, 2:] = [1, 0]
  dec = np.concatenate([np.zeros((4, 1), np.int32), tgt[:, :-1]], axis=1)
  # Task ids as T5X batches them: [batch, 1] (the tasks emit length-1 vectors).
  return dict(encoder_input_tokens=enc, decoder_input_tokens=dec, decoder_target_tokens=tgt,
              decoder_loss_weights=(tgt > 0).astype(np.int32),
              task_ids=np.array([[0], [1], [2], [1]], np.int32))


def _project_batch(batch):
  return dict(batch, task_ids=batch['task_ids'][:, 0])


def _until_eos(row):
  row = list(np.asarray(row))
  return row[:row.index(1) + 1] if 1 in row else row


@pytest.mark.parametrize('method', network.METHODS)
def test_loss_scores_and_greedy_equal_the_project_model(method):
  """Greedy = T5X's sampling at temperature 0 (a width-1 beam search is not greedy:
  it keeps the best finished sequence, see the beam test)."""
  config = _config(method)
  params = network.random_params(config, seed=1)
  batch = _batch()
  other = dict(batch, task_ids=(batch['task_ids'] + 1) % 3)
  ours = models.EncoderDecoderModel(config, z_loss=1e-4)
  theirs = _t5x_model(config, decode_fn=t5x_decoding.temperature_sample)

  @jax.jit  # one compile per side
  def run_theirs(p, b, o):
    sampled, _ = theirs.predict_batch_with_aux(
        p, b, decoder_params={'temperature': 0.0}, rng=jax.random.PRNGKey(0))
    return (theirs.loss_fn(p, b, None)[0], theirs.score_batch(p, b), sampled,
            theirs.score_batch(p, o))

  @jax.jit
  def run_ours(p, b):
    return (ours.loss_fn(p, b, None)[0], ours.score_batch(p, b),
            ours.predict_batch(p, b, TARGET_LEN))

  loss, scores, sampled, other_scores = run_theirs(params, batch, other)
  want_loss, want_scores, greedy = run_ours(params, _project_batch(batch))
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  np.testing.assert_allclose(scores, want_scores, rtol=1e-5)
  for got, want in zip(np.asarray(sampled), np.asarray(greedy)):
    assert _until_eos(got) == _until_eos(want)
  if method != 'none':  # the task ids matter: other ids score differently
    assert not np.allclose(other_scores, scores)


@pytest.mark.parametrize('method', ['global', 'prompt_tuning'])
def test_beams_score_their_sequences_like_teacher_forcing(method):
  """Each of 3 beams (task ids and encoder outputs expanded per beam) scores its
  sequence as teacher forcing does, and the beams come sorted, best last. (Beam
  search need not beat greedy on a random model: it may prune greedy's path.)"""
  config = _config(method)
  params = network.random_params(config, seed=2)
  batch = _batch()
  ours = models.EncoderDecoderModel(config, z_loss=0.0)
  beams = _t5x_model(config)
  decodes, aux = jax.jit(lambda p, b: beams.predict_batch_with_aux(  # one compile, not per op
      p, b, num_decodes=3, return_all_decodes=True, decoder_params={'alpha': 0.0}))(
          params, batch)
  score_batch = jax.jit(ours.score_batch)
  assert decodes.shape == (4, 3, TARGET_LEN)

  def score(tokens):
    tokens = np.asarray(tokens)
    # Weights up to and including the first EOS (a random model may emit id 0).
    live = (np.cumsum(tokens == 1, axis=1) - (tokens == 1)) == 0
    dec = np.concatenate([np.zeros((4, 1), np.int32), tokens[:, :-1]], axis=1)
    return np.asarray(score_batch(params, dict(
        _project_batch(batch), decoder_input_tokens=dec, decoder_target_tokens=tokens,
        decoder_loss_weights=live.astype(np.int32))))

  # Beams without the padding id 0 (random weights may emit it mid-sequence).
  finished = np.all(np.asarray(decodes) != 0, axis=-1)  # [batch, beams]
  assert finished.sum() >= 6
  for k in range(3):  # such a beam's score is its sequence's log-likelihood
    np.testing.assert_allclose(np.asarray(aux['scores'][:, k])[finished[:, k]],
                               score(decodes[:, k])[finished[:, k]], rtol=1e-4, atol=1e-4)
  assert np.all(np.diff(np.asarray(aux['scores']), axis=1) >= 0)


def test_initial_variables_are_the_network_tree_with_axes():
  config = _config('global')
  # Shapes only: traced, not compiled (an eager init compiles op by op).
  variables = jax.eval_shape(lambda rng: _t5x_model(config).get_initial_variables(
      rng, {'encoder_input_tokens': (2, 5), 'decoder_input_tokens': (2, 3)},
      {'encoder_input_tokens': jnp.int32, 'decoder_input_tokens': jnp.int32}),
                             jax.random.PRNGKey(0))
  shapes = jax.tree_util.tree_map(lambda x: x.shape, network.param_shapes(config))
  assert jax.tree_util.tree_map(lambda x: x.shape, dict(variables['params'])) == shapes
  assert 'task_conditioning' in variables['params_axes']


def test_bad_batches_get_one_clear_error():
  model = _t5x_model(_config('global'))
  params = network.random_params(_config('global'))
  batch = _batch()
  with pytest.raises(ValueError, match='no "task_ids" feature'):
    model.loss_fn(params, {k: v for k, v in batch.items() if k != 'task_ids'}, None)
  with pytest.raises(ValueError, match='given together'):
    model.loss_fn(params, dict(batch, encoder_segment_ids=np.ones((4, 7), np.int32)), None)
  with pytest.raises(TypeError, match='network.Transformer'):
    t5x_model.HyperPromptEncoderDecoderModel(object(), None, None, None)


def test_conditioning_axes_have_factor_and_partitioning_rules():
  """T5X's Adafactor accepts every parameter's axes; no conditioning axis is sharded."""
  from t5x import adafactor
  config = _config('hyperformer')
  axes = models.EncoderDecoderModel(config).logical_axes(4, 4)
  opt = adafactor.Adafactor(logical_factor_rules=t5x_model.logical_factor_rules())
  opt.set_param_axes(axes)  # KeyError on an axis without a rule
  assert dict(t5x_model.conditioning_axis_rules())['hyper_bottleneck'] is None


def test_only_the_t5x_adapter_imports_t5x():
  """No module of the package or its tasks but t5x_model names t5x in an import
  (read from the source: this process has imported t5x already)."""
  import ast
  import pathlib
  package = pathlib.Path(t5x_model.__file__).parents[1]
  sources = sorted(package.rglob('*.py'))
  assert len(sources) > 30
  importers = set()
  for path in sources:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
               [node.module or ''] if isinstance(node, ast.ImportFrom) and not node.level else [])
      if any(n == 't5x' or n.startswith('t5x.') for n in names):
        importers.add(path.name)
  assert importers == {'t5x_model.py'}


def test_restore_transformation_refuses_other_models_and_project_layouts():
  from hyperprompt_t5x.checkpoints.pretrained import CheckpointError
  target = {'target': {'encoder': {'k': 0}, 'task_conditioning': {'p': 0}},
            'state': {'step': 0, 'param_states': {}}}
  t5x_ckpt = {'target': {'encoder': {'k': 1}}, 'state': {'step': 1000000}}
  assert t5x_model.check_checkpoint_fits(t5x_ckpt, target) is t5x_ckpt  # T5 1.1 backbone
  full = {'target': {'encoder': {'k': 1}, 'task_conditioning': {'p': 2}}, 'state': {}}
  assert t5x_model.check_checkpoint_fits(full, target) is full
  other = {'target': {'encoder': {'k': 1}, 'task_conditioning': {'q': 2}}, 'state': {}}
  with pytest.raises(CheckpointError, match='another method, size'):
    t5x_model.check_checkpoint_fits(other, target)
  shaped = {'target': {'encoder': {'k': np.zeros((2, 3))}}, 'state': {}}
  with pytest.raises(CheckpointError, match=r"1 of another shape: \['encoder/k: "
                                            r"checkpoint \(2, 3\), model \(2, 4\)'\]"):
    t5x_model.check_checkpoint_fits(shaped, {'target': {'encoder': {'k': np.zeros((2, 4))}}})
  project = {'step': 7, 'params': full['target'], 'opt_state': {}}
  with pytest.raises(CheckpointError, match='project_checkpoint.gin'):
    t5x_model.check_checkpoint_fits(project, target)


def test_known_bad_input_under_t5x_is_one_line():
  from hyperprompt_t5x.checkpoints.pretrained import CheckpointError
  line = t5x_model.one_line_error
  assert line(ValueError('MODEL_DIR/macro.value set to `%gin.REQUIRED` but not subsequently '
                         'overridden.')).startswith(
      'required gin macro MODEL_DIR is not set (gin files: ')
  assert line(RuntimeError("Required bindings for `evaluate` not provided in config: "
                           "['model', 'output_dir']")).endswith(
      'add --gin.evaluate.model=... --gin.evaluate.output_dir=...')
  assert line(CheckpointError('ckpt: does not fit\n  In call to configurable')) == (
      'ckpt: does not fit')
  assert line(ValueError('something else')) is None


class _FakeTrainer:
  """T5X's BaseTrainer surface that prompt_scale_trainer uses: train_state, train()."""

  def __init__(self, *, model, train_state, partitioner, summary_dir):
    del model, partitioner, summary_dir
    self.train_state = train_state
    self.trained_on = []

  def train(self, batch_iter, num_steps, start_step=None):
    del start_step
    self.trained_on += [next(batch_iter) for _ in range(num_steps)]


class _FakeState:
  def __init__(self, step, params):
    self.step, self.params = jnp.asarray(step), params

  def replace_params(self, params):
    return _FakeState(self.step, params)


class _FakePartitioner:
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ('data',))
  data_partition_spec = None


@pytest.mark.parametrize('method,path,step,dir_steps,calibrates', [
    ('global', 'gs://b/t5_1_1_base/checkpoint_7', 7, [], True),  # fresh from the checkpoint
    ('global', 'gs://b/t5_1_1_base/checkpoint_7', 7, [7], True),  # resumed from T5X's step-7 save
    ('global', 'gs://b/t5_1_1_base/checkpoint_7', 9, [7, 9], False),  # resumed after training
    ('share', '/ckpts/t5_tiny', 0, [], True),  # a name without a step: MODEL_DIR is empty
    ('share', '/ckpts/t5_tiny', 0, [0], False),
    ('global', None, 0, [], False),  # from scratch
    ('prompt_tuning', 'gs://b/checkpoint_7', 7, [], False),  # no hyper-prompts
])
def test_prompt_scale_trainer_calibrates_at_the_first_step_from_a_checkpoint(
    method, path, step, dir_steps, calibrates, tmp_path, caplog):
  config = _config(method)
  model = _t5x_model(config)
  for s in dir_steps:
    (tmp_path / f'checkpoint_{s}').mkdir()
    (tmp_path / f'checkpoint_{s}' / 'checkpoint').write_bytes(b'')
  params = jax.tree_util.tree_map(jnp.asarray, network.random_params(config, seed=1))
  trainer = t5x_model.prompt_scale_trainer(
      trainer_cls=_FakeTrainer, initial_checkpoint_path=path, model=model,
      train_state=_FakeState(step, flax.core.freeze(params)),
      partitioner=_FakePartitioner(), summary_dir=str(tmp_path))
  batches = [_batch(), dict(_batch(), task_ids=np.array([[2], [2], [0], [1]], np.int32))]
  caplog.set_level('INFO', logger='absl')  # the CLI (other tests) quiets absl
  trainer.train(iter(batches), 2)
  # The first batch is trained on, whether or not it was measured first.
  assert [b['task_ids'].tolist() for b in trainer.trained_on] == [
      b['task_ids'].tolist() for b in batches]
  lines = [r.getMessage() for r in caplog.records if 'norm ratio per block' in r.getMessage()]
  got = flax.core.unfreeze(trainer.train_state.params)
  same = all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(got),
                                                  jax.tree_util.tree_leaves(params)))
  if not calibrates:
    assert not lines and same
    return
  assert len(lines) == 1 and 'after rescaling: ' in lines[0] and not same
  assert isinstance(trainer.train_state.params, flax.core.FrozenDict)  # T5X's type kept
  after = prompt_scale.norm_ratios(config, got, _project_batch(batches[0]))
  for kind in after:
    for name in ('key', 'value'):
      np.testing.assert_allclose(after[kind][name], 1.0, atol=0.06, err_msg=f'{kind} {name}')
  trainer.train(iter(batches), 1)  # later calls train as T5X's trainer does: no second line
  assert len(trainer.trained_on) == 3
  assert sum('norm ratio per block' in r.getMessage() for r in caplog.records) == 1


def test_prompt_scale_trainer_switch_must_be_a_bool():
  with pytest.raises(ValueError, match='calibrate_prompt_scale must be a bool.*'
                                       'CALIBRATE_PROMPT_SCALE'):
    t5x_model.prompt_scale_trainer(trainer_cls=_FakeTrainer, calibrate_prompt_scale='no')


def test_a_vocabulary_larger_than_the_model_is_one_line_under_t5x():
  """Checked as the model is built (gin's MODEL), before T5X restores or writes anything;
  T5X's entry points print one_line_error's line and exit 2."""
  config = _config('global')
  big = seqio.PassThroughVocabulary(config.vocab_size + 1, eos_id=1)
  with pytest.raises(ValueError) as e:
    t5x_model.HyperPromptEncoderDecoderModel(network.Transformer(config), big, big,
                                             t5x_optimizers.sgd(0.1))
  assert t5x_model.one_line_error(e.value) == (
      f'the vocabulary of this T5X run (gin VOCABULARY) has {config.vocab_size + 1} ids but '
      f'the model has {config.vocab_size} embedding rows (T5Config.vocab_size = '
      f'{config.vocab_size}); set T5Config.vocab_size >= {config.vocab_size + 1} or use a '
      'smaller vocabulary')
  # More rows than ids is T5's own case (32128 rows for 32100 ids): accepted.
  fewer = seqio.PassThroughVocabulary(config.vocab_size - 4, eos_id=1)
  t5x_model.HyperPromptEncoderDecoderModel(network.Transformer(config), fewer, fewer,
                                           t5x_optimizers.sgd(0.1))


def test_a_checkpoint_of_other_embedding_rows_is_one_line_under_t5x():
  have = {'target': {'token_embedder': {'embedding': np.zeros((32128, 8), np.float32)}}}
  want = {'target': {'token_embedder': {'embedding': jax.ShapeDtypeStruct((2048, 8),
                                                                          jnp.float32)}}}
  with pytest.raises(ValueError) as e:
    t5x_model.check_checkpoint_fits(have, want)
  assert t5x_model.one_line_error(e.value) == (
      'the checkpoint does not fit this model: 32128 embedding rows in the checkpoint, 2048 '
      'in the model (T5Config.vocab_size = 2048); set T5Config.vocab_size = 32128 to '
      'fine-tune it (the vocabulary may have fewer ids than the rows)')
