"""A checkpoint of the lean trainer (`hyperprompt-t5x train`) under real T5X.

One short lean demo run (40 steps: accuracies between chance and 100) serves
every test here: `python -m t5x.eval` scores it as `hyperprompt-t5x eval` does,
`python -m t5x.infer` predicts as `hyperprompt-t5x infer` does, T5X's restore
of it inside a training state holds the same parameters, and a model of
another task count is refused with one line. Also: a T5X gin without a
required macro fails with one line, before anything is built.
"""
import contextlib
import io
import json

import numpy as np
import pytest

pytest.importorskip(
    't5x', reason='t5x not importable (install it with scripts/install_t5x.sh)')

from hyperprompt_t5x.cli import commands  # noqa: E402

from conftest import run_t5x  # noqa: E402

STEPS = 40
TASKS = ('hyperprompt_demo_has_a', 'hyperprompt_demo_max', 'hyperprompt_demo_min')


@pytest.fixture(scope='module')
def lean_run(tmp_path_factory, compilation_cache):
  """MODEL_DIR of a short lean demo run, its `eval` scores and `infer` predictions.

  One XLA cache (`compilation_cache`) for the module and its T5X runs: t5x.infer
  reuses t5x.eval's decode.
  """
  del compilation_cache
  model_dir = tmp_path_factory.mktemp('lean') / 'run'
  common = ['--gin_file=demo.gin', f'--gin.MODEL_DIR={model_dir}', '--gin.XLA_FLAGS=None']
  with contextlib.redirect_stdout(io.StringIO()):
    assert commands.main(['train', *common, f'--gin.TRAIN_STEPS={STEPS}', '--gin.EVAL_PERIOD=None',
                     f'--gin.SAVE_PERIOD={STEPS}']) == 0
    assert commands.main(['eval', *common]) == 0
    predictions = model_dir.parent / 'predictions.jsonl'
    assert commands.main(['infer', *common, f'--gin.INFER_OUTPUT_PATH={predictions}']) == 0
  scores = json.loads((model_dir / f'eval_validation_{STEPS}.json').read_text())
  rows = [json.loads(l) for l in predictions.read_text().splitlines()]
  return model_dir, scores, rows


def test_t5x_eval_scores_a_lean_checkpoint_like_the_project(lean_run, tmp_path,
                                                            compilation_cache):
  model_dir, scores, _ = lean_run
  ours = {task: entry['accuracy'] for task, entry in scores['tasks'].items()}
  assert sorted(ours) == list(TASKS)
  assert any(40.0 < acc < 100.0 for acc in ours.values()), ours  # not a trivial agreement
  out = tmp_path / 'eval'
  run_t5x('eval', 'demo_eval.gin', tmp_path, f"CHECKPOINT_PATH='{model_dir}/checkpoint_{STEPS}'",
          f"EVAL_OUTPUT_DIR='{out}'", cache=compilation_cache)
  theirs = {}
  for task in TASKS:
    record = json.loads((out / 'inference_eval' / f'{task}-metrics.jsonl')
                        .read_text().splitlines()[-1])
    assert record['step'] == STEPS
    theirs[task] = record['accuracy']
  assert theirs == ours


def test_t5x_infer_predicts_a_lean_checkpoint_like_the_project(lean_run, tmp_path,
                                                              compilation_cache):
  model_dir, _, rows = lean_run
  out = tmp_path / 'infer'
  run_t5x('infer', 'demo_infer.gin', tmp_path,
          f"CHECKPOINT_PATH='{model_dir}/checkpoint_{STEPS}'", f"INFER_OUTPUT_DIR='{out}'",
          cache=compilation_cache)
  for task in TASKS:
    ours = [(r['inputs'], r['prediction']) for r in rows if r['task'] == task]
    lines = (out / f'{task}-predict.jsonl-00000-of-00001').read_text().splitlines()
    theirs = [(r['inputs']['inputs_pretokenized'], r['prediction'])
              for r in map(json.loads, lines)]
    assert len(theirs) == 256 and theirs == ours, task
    assert len({p for _, p in theirs}) > 1  # not one constant answer


def _t5x_manager(model_dir, num_tasks):
  """T5X's training state (Adafactor, as gin/t5x/model.gin) and our checkpoint manager."""
  import jax.numpy as jnp
  import seqio
  from t5x import adafactor, partitioning, utils
  from hyperprompt_t5x.model import network
  from hyperprompt_t5x.t5x_adapter import t5x_model
  fields = json.loads((model_dir / 'model_config.json').read_text())
  fields.update(mlp_activations=tuple(fields['mlp_activations']), num_tasks=num_tasks)
  vocabulary = seqio.ByteVocabulary()
  model = t5x_model.HyperPromptEncoderDecoderModel(
      network.Transformer(network.T5Config(**fields)), vocabulary, vocabulary,
      adafactor.Adafactor(logical_factor_rules=t5x_model.logical_factor_rules()))
  partitioner = partitioning.PjitPartitioner(
      num_partitions=1, logical_axis_rules=partitioning.standard_logical_axis_rules(
          additional_rules=t5x_model.conditioning_axis_rules()))
  shapes = {'encoder_input_tokens': (2, 8), 'decoder_input_tokens': (2, 2)}
  initializer = utils.TrainStateInitializer(
      model.optimizer_def, model.get_initial_variables, shapes, partitioner,
      {k: jnp.int32 for k in shapes})
  return t5x_model.HyperPromptCheckpointManager(
      directory=str(model_dir), train_state=initializer.global_train_state_shape,
      partitioner=partitioner)


def test_t5x_training_state_restores_a_lean_checkpoint_or_refuses_another_model(lean_run):
  from flax import traverse_util
  from hyperprompt_t5x.checkpoints import pretrained
  from hyperprompt_t5x.t5x_adapter import t5x_model
  model_dir, _, _ = lean_run
  path = str(model_dir / f'checkpoint_{STEPS}')
  state = _t5x_manager(model_dir, 3).restore(
      path=path, state_transformation_fns=[t5x_model.check_checkpoint_fits])
  assert int(state.step) == STEPS
  ours = pretrained.flatten_params(pretrained.load_t5x_params(path))
  theirs = pretrained.flatten_params(traverse_util.unflatten_dict(
      traverse_util.flatten_dict(dict(state.params))))
  assert sorted(ours) == sorted(theirs)
  for name, value in ours.items():
    np.testing.assert_array_equal(np.asarray(theirs[name]), value, err_msg=name)
  # The lean demo trains with AdamW: T5X's Adafactor slots start at zero.
  slots = traverse_util.flatten_dict(state.state_dict()['state']['param_states'])
  assert slots and all(not np.any(np.asarray(v)) for v in slots.values())
  with pytest.raises(pretrained.CheckpointError,
                     match=r'checkpoint_40: the checkpoint does not fit the model \(another '
                           r'method, size or number of tasks\?\): 2 of another shape'):
    _t5x_manager(model_dir, 4).restore(
        path=path, state_transformation_fns=[t5x_model.check_checkpoint_fits])


def test_t5x_beam_search_on_the_trained_checkpoint_equals_the_projects_greedy(lean_run):
  """T5X's `decoding.beam_search` (4 beams, task ids expanded per beam) through the
  T5X model class, on the trained lean checkpoint: its best beam is the project's
  greedy prediction for every validation input (in-process; no T5X entry point)."""
  import jax
  import seqio
  from t5x import adafactor, decoding
  from hyperprompt_t5x.checkpoints import pretrained
  from hyperprompt_t5x.model import network
  from hyperprompt_t5x.t5x_adapter import t5x_model
  from hyperprompt_t5x.tasks import mixtures
  model_dir, _, rows = lean_run
  fields = json.loads((model_dir / 'model_config.json').read_text())
  fields.update(mlp_activations=tuple(fields['mlp_activations']))
  vocabulary = seqio.ByteVocabulary()
  model = t5x_model.HyperPromptEncoderDecoderModel(
      network.Transformer(network.T5Config(**fields)), vocabulary, vocabulary,
      adafactor.Adafactor(), decode_fn=decoding.beam_search)
  params = pretrained.load_t5x_params(str(model_dir / f'checkpoint_{STEPS}'))
  inputs = np.zeros((len(rows), 8), np.int32)  # [batch, inputs_len]: bytes + EOS, padded
  for i, r in enumerate(rows):
    ids = vocabulary.encode(r['inputs']) + [1]
    inputs[i, :len(ids)] = ids
  batch = {'encoder_input_tokens': inputs,
           'decoder_input_tokens': np.zeros((len(rows), 2), np.int32),
           'task_ids': np.array([[mixtures.task_id('hyperprompt_demo', r['task'])] for r in rows],
                                np.int32)}
  decodes = jax.jit(lambda p, b: model.predict_batch_with_aux(
      p, b, decoder_params={'alpha': 0.0})[0])(
      params, batch)  # [batch, targets_len]: the best of 4 beams
  beams = [vocabulary.decode([t for t in row if t > 1]) for row in np.asarray(decodes).tolist()]
  assert beams == [r['prediction'] for r in rows]


def test_t5x_gin_without_a_required_macro_fails_with_one_line(tmp_path):
  err = run_t5x('train', 'demo.gin', tmp_path, expect_rc=2)
  assert err.splitlines()[-1] == (
      'error: required gin macro MODEL_DIR is not set (gin files: '
      "hyperprompt_t5x/gin/t5x/demo.gin): add --gin.MODEL_DIR=...")
  assert 'Traceback' not in err
  assert not any(tmp_path.iterdir())  # nothing written
