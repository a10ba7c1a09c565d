"""A SentencePiece vocabulary end to end, offline, and the vocabulary-size checks.

The vocabulary is a 2000-piece SentencePiece model trained here on GLUE training
texts (conftest.sentencepiece_model; T5's conventions) with 28 sentinel ids:
2028 ids. One short run (`hyperprompt-t5x train` on RTE from the real tiny T5X
checkpoint, whose 32128 embedding rows exceed the ids, as T5's 32128 do its 32100)
serves the tests: it records its vocabulary in MODEL_DIR, and eval, infer,
load() and a resumed train use it with HYPERPROMPT_VOCABULARY unset (offline, the
variable unset would otherwise mean T5's gs:// model). T5X's eval of the same
checkpoint takes the vocabulary from its gin.
"""
import contextlib
import hashlib
import io
import json
import shutil

import numpy as np
import pytest

from hyperprompt_t5x.cli import commands
from hyperprompt_t5x.run import model_dir_files

from conftest import SPM_EXTRA_IDS, SPM_PIECES, run_t5x, shared_file

TASK = 'hyperprompt_glue_rte'
LENGTHS = {'inputs': 48, 'targets': 8}   # 'not_entailment' is 5 pieces + EOS
IDS = SPM_PIECES + SPM_EXTRA_IDS
# The real T5X checkpoint's shapes (32128 embedding rows).
T5X_TINY = dict(vocab_size=32128, emb_dim=8, num_heads=4, head_dim=3, num_encoder_layers=2,
                num_decoder_layers=2, mlp_dim=16)
STEPS = 20   # at LEARNING_RATE 0.02 the predictions are RTE's words (after 2 steps: unk ids)
VOCAB_ENV = ('HYPERPROMPT_VOCABULARY', 'HYPERPROMPT_VOCABULARY_EXTRA_IDS')


def model_args(model_dir, task=TASK, **shapes) -> list:
  """demo.gin's model and run settings on RTE at the T5X checkpoint's shapes."""
  shapes = dict(T5X_TINY, **shapes)
  return ['--gin_file=demo.gin', f'--gin.MODEL_DIR={model_dir}', '--gin.XLA_FLAGS=None',
          f"--gin.MIXTURE_OR_TASK_NAME='{task}'", '--gin.NUM_TASKS=1',
          f'--gin.TASK_FEATURE_LENGTHS={LENGTHS}', '--gin.EVAL_MAX_EXAMPLES=16',
          '--gin.EVAL_BATCH_SIZE=16', '--gin.BATCH_SIZE=8', '--gin.LEARNING_RATE=0.02',
          *[f'--gin_bindings=T5Config.{k} = {v}' for k, v in shapes.items()]]


def train_args(model_dir, checkpoint, steps, **shapes) -> list:
  return ['train', *model_args(model_dir, **shapes), f'--gin.INITIAL_CHECKPOINT_PATH={checkpoint}',
          f'--gin.TRAIN_STEPS={steps}', f'--gin.SAVE_PERIOD={STEPS}', '--gin.EVAL_PERIOD=None',
          '--gin.LOG_PERIOD=10']


def main(argv) -> tuple:
  """commands.main(argv) -> (exit status, stdout); stderr stays with capsys."""
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    rc = commands.main(argv)
  return rc, out.getvalue()


@pytest.fixture(scope='module', autouse=True)
def _glue_and_cache(compilation_cache):
  """GLUE from ../shared/data; the tasks' vocabulary restored after the module."""
  from hyperprompt_t5x import tasks
  previous = tasks.get_vocabulary()
  tasks.set_data_dirs(glue_dir=str(shared_file('glue/RTE/train.tsv').parents[1]))
  yield compilation_cache
  tasks.set_vocabulary(previous)
  tasks.set_data_dirs(None, None)


@pytest.fixture
def vocabulary_unset(monkeypatch):
  """HYPERPROMPT_VOCABULARY unset: offline, the tasks would reach for gs://."""
  from hyperprompt_t5x import tasks
  for name in VOCAB_ENV:
    monkeypatch.delenv(name, raising=False)
  tasks.set_vocabulary(None)   # T5's gs:// model, not read until used


@pytest.fixture(scope='module')
def spm_run(tmp_path_factory, sentencepiece_model, t5x_tiny_checkpoint):
  """MODEL_DIR of 2 steps on RTE, trained with HYPERPROMPT_VOCABULARY=<the .model>."""
  from hyperprompt_t5x import tasks
  model_dir = tmp_path_factory.mktemp('spm_run') / 'run'
  with pytest.MonkeyPatch.context() as env:
    env.setenv('HYPERPROMPT_VOCABULARY', str(sentencepiece_model))
    env.setenv('HYPERPROMPT_VOCABULARY_EXTRA_IDS', str(SPM_EXTRA_IDS))
    tasks.set_vocabulary(None)
    rc, out = main(train_args(model_dir, t5x_tiny_checkpoint, STEPS))
  assert rc == 0
  return model_dir, out


def test_sentencepiece_tasks_tokenise_and_detokenise_words(sentencepiece_model, monkeypatch):
  from hyperprompt_t5x import tasks
  from hyperprompt_t5x.tasks import vocab
  monkeypatch.setenv('HYPERPROMPT_VOCABULARY', str(sentencepiece_model))
  monkeypatch.setenv('HYPERPROMPT_VOCABULARY_EXTRA_IDS', str(SPM_EXTRA_IDS))
  vocabulary = tasks.set_vocabulary(None)
  assert tasks.get_vocabulary(TASK) is vocabulary
  assert vocab.describe(vocabulary)['vocab_size'] == IDS
  batch = next(tasks.get_dataset(TASK, 'validation', LENGTHS, batch_size=8, shuffle=False)
               .as_numpy_iterator())
  inputs = batch['encoder_input_tokens']
  assert inputs.max() < SPM_PIECES and inputs.max() > 259   # pieces, not bytes
  texts = tasks.decode_predictions(TASK, inputs)
  assert all(t.startswith('rte sentence1: ') for t in texts), texts
  targets = tasks.decode_predictions(TASK, batch['decoder_target_tokens'])
  assert set(targets) <= {'entailment', 'not_entailment'} and targets, targets
  # Words back: a whole (untruncated) input decodes to the text it was encoded from.
  import seqio
  example = next(seqio.get_mixture_or_task(TASK).get_dataset(
      {'inputs': 512, 'targets': 8}, split='validation', shuffle=False,
      use_cached=False).as_numpy_iterator())
  text = example['inputs_pretokenized'].decode()
  assert text.startswith('rte sentence1: ') and vocabulary.decode(example['inputs']) == text


def test_a_run_records_its_vocabulary(spm_run, sentencepiece_model):
  model_dir, out = spm_run
  record = json.loads((model_dir / model_dir_files.VOCABULARY_FILE).read_text())
  sha = hashlib.sha256(sentencepiece_model.read_bytes()).hexdigest()
  assert record == {'kind': 'sentencepiece', 'vocab_size': IDS, 'pieces': SPM_PIECES,
                    'extra_ids': SPM_EXTRA_IDS, 'sha256': sha,
                    'source': str(sentencepiece_model)}
  copy = model_dir / model_dir_files.VOCABULARY_MODEL_FILE
  assert copy.read_bytes() == sentencepiece_model.read_bytes()
  # 2028 ids in 32128 rows trained; step 0 calibrated the prompts on the restored backbone.
  assert json.loads((model_dir / 'model_config.json').read_text())['vocab_size'] == 32128
  assert 'after rescaling' in out and (model_dir / f'checkpoint_{STEPS}').is_dir()


def test_eval_infer_and_load_use_the_runs_vocabulary(spm_run, vocabulary_unset, tmp_path):
  import hyperprompt_t5x
  from hyperprompt_t5x.tasks import vocab
  model_dir, _ = spm_run
  rc, out = main(['eval', *model_args(model_dir)])
  assert rc == 0, out
  scored = json.loads((model_dir / f'eval_validation_{STEPS}.json').read_text())
  assert list(scored['tasks']) == [TASK] and scored['tasks'][TASK]['accuracy'] > 0
  rc, out = main(['analyze', *model_args(model_dir)])
  assert rc == 0 and (model_dir / 'analysis').is_dir(), out
  inputs = tmp_path / 'inputs.jsonl'
  rows = [{'sentence1': 'A cat sat on the mat.', 'sentence2': 'A cat sat.'},
          {'sentence1': 'The company reported a loss.', 'sentence2': 'It made money.'}]
  inputs.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  rc, out = main(['infer', f'--gin.MODEL_DIR={model_dir}', f'--input_file={inputs}',
                  f'--task={TASK}'])
  assert rc == 0, out
  predicted = [json.loads(line)['prediction'] for line in out.splitlines()
               if line.startswith('{')]
  assert len(predicted) == 2
  model = hyperprompt_t5x.load(str(model_dir))
  assert vocab.same(vocab.describe(model.run.vocabulary),
                    json.loads((model_dir / model_dir_files.VOCABULARY_FILE).read_text()))
  assert model.predict(rows, task=TASK) == predicted
  assert set(predicted) <= {'entailment', 'not_entailment'}, predicted   # words again
  scores = model.score(rows, ['entailment', 'not_entailment'], task=TASK)
  assert np.all(np.isfinite(scores)) and np.all(np.asarray(scores) < 0)


def test_resume_uses_the_runs_vocabulary(spm_run, vocabulary_unset, t5x_tiny_checkpoint,
                                         tmp_path):
  model_dir, _ = spm_run
  resumed = tmp_path / 'run'
  shutil.copytree(model_dir, resumed)
  rc, out = main(train_args(resumed, t5x_tiny_checkpoint, STEPS + 1))
  assert rc == 0, out
  assert f'Starting at step {STEPS} from {resumed}/checkpoint_{STEPS}' in out
  assert (resumed / f'checkpoint_{STEPS + 1}').is_dir()


def test_a_missing_or_changed_vocabulary_is_one_line(spm_run, vocabulary_unset, tmp_path,
                                                      capsys, monkeypatch):
  model_dir, _ = spm_run
  copy = tmp_path / 'run'
  shutil.copytree(model_dir, copy)
  spm = copy / model_dir_files.VOCABULARY_MODEL_FILE
  data = spm.read_bytes()
  spm.unlink()
  assert main(['eval', *model_args(copy)])[0] == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith(f'error: {spm} is missing: it is the SentencePiece model this run was '
                        'trained with'), err
  assert len(err.splitlines()) == 1
  spm.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
  assert main(['eval', *model_args(copy)])[0] == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith(f'error: {spm} differs from the SentencePiece model'), err
  spm.write_bytes(data)
  monkeypatch.setenv('HYPERPROMPT_VOCABULARY', 'byte')
  assert main(['eval', *model_args(copy)])[0] == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith('error: HYPERPROMPT_VOCABULARY=byte is byte (259 ids), but MODEL_DIR '
                        f'{copy} was trained with sentencepiece'), err
  assert not list(copy.glob('eval_*_2.json')) or (copy / 'eval_validation_2.json').read_bytes() \
      == (model_dir / f'eval_validation_{STEPS}.json').read_bytes()


def test_a_vocabulary_larger_than_the_model_is_one_line(spm_run, vocabulary_unset, tmp_path,
                                                        capsys, sentencepiece_model,
                                                        t5x_tiny_checkpoint, monkeypatch):
  model_dir, _ = spm_run
  line = (f"error: the vocabulary of '{TASK}' has {IDS} ids but the model has 1024 embedding "
          f'rows (T5Config.vocab_size = 1024); set T5Config.vocab_size >= {IDS} or use a '
          'smaller vocabulary')
  for command in ('eval', 'infer'):   # the run's vocabulary, a model of too few rows
    assert main([command, *model_args(model_dir, vocab_size=1024)])[0] == 2
    assert capsys.readouterr().err.strip() == line
  monkeypatch.setenv('HYPERPROMPT_VOCABULARY', str(sentencepiece_model))
  monkeypatch.setenv('HYPERPROMPT_VOCABULARY_EXTRA_IDS', str(SPM_EXTRA_IDS))
  from hyperprompt_t5x import tasks
  tasks.set_vocabulary(None)
  fresh = tmp_path / 'fresh'
  assert main(train_args(fresh, t5x_tiny_checkpoint, 2, vocab_size=1024))[0] == 2
  assert capsys.readouterr().err.strip() == line
  assert not fresh.exists()


def test_a_checkpoint_of_other_embedding_rows_is_one_line(vocabulary_unset, tmp_path, capsys,
                                                          sentencepiece_model,
                                                          t5x_tiny_checkpoint, monkeypatch):
  """2048 rows fit the 2028 ids, but the T5X checkpoint has 32128."""
  from hyperprompt_t5x import tasks
  monkeypatch.setenv('HYPERPROMPT_VOCABULARY', str(sentencepiece_model))
  monkeypatch.setenv('HYPERPROMPT_VOCABULARY_EXTRA_IDS', str(SPM_EXTRA_IDS))
  tasks.set_vocabulary(None)
  fresh = tmp_path / 'fresh'
  assert main(train_args(fresh, t5x_tiny_checkpoint, 2, vocab_size=2048))[0] == 2
  assert capsys.readouterr().err.strip() == (
      f'error: {t5x_tiny_checkpoint}: 32128 embedding rows in the checkpoint, 2048 in the '
      'model (T5Config.vocab_size = 2048); set T5Config.vocab_size = 32128 to fine-tune it '
      '(the vocabulary may have fewer ids than the rows)')
  assert not fresh.exists()


# -- under T5X -----------------------------------------------------------------------

# T5X feeds each example its task's id in the task's home mixture (seqio's feature), the
# project a lone task id 0: CoLA is GLUE's task 0, so the two agree on it.
T5X_TASK = 'hyperprompt_glue_cola'


def t5x_eval_bindings(model_dir, out, **shapes) -> list:
  """demo_eval.gin on the run's checkpoint: lengths, shapes, and the vocabulary from gin."""
  shapes = dict(T5X_TINY, **shapes)
  return [f"CHECKPOINT_PATH='{model_dir}/checkpoint_{STEPS}'", f"EVAL_OUTPUT_DIR='{out}'",
          f"MIXTURE_OR_TASK_NAME='{T5X_TASK}'", 'NUM_TASKS=1', f'TASK_FEATURE_LENGTHS={LENGTHS}',
          f"VOCABULARY_FILE='{model_dir / model_dir_files.VOCABULARY_MODEL_FILE}'",
          f'VOCABULARY_EXTRA_IDS={SPM_EXTRA_IDS}',
          *[f'network.T5Config.{k}={v}' for k, v in shapes.items()]]


def test_t5x_eval_of_the_run_predicts_the_same_words(spm_run, vocabulary_unset, tmp_path,
                                                     compilation_cache, monkeypatch):
  pytest.importorskip('t5x', reason='t5x not importable (install it with scripts/install_t5x.sh)')
  model_dir, _ = spm_run
  predictions = tmp_path / 'ours.jsonl'
  rc, out = main(['infer', *model_args(model_dir, task=T5X_TASK),
                  f'--gin.INFER_OUTPUT_PATH={predictions}', '--gin.EVAL_MAX_EXAMPLES=None'])
  assert rc == 0, out
  ours = [json.loads(line)['prediction'] for line in predictions.read_text().splitlines()]
  out_dir = tmp_path / 't5x_eval'
  monkeypatch.setenv('HYPERPROMPT_GLUE_DIR', str(shared_file('glue/CoLA/dev.tsv').parents[1]))
  run_t5x('eval', 'demo_eval.gin', tmp_path, *t5x_eval_bindings(model_dir, out_dir),
          cache=compilation_cache)
  written = out_dir / 'inference_eval' / f'{T5X_TASK}-{STEPS:06d}.jsonl'
  theirs = [json.loads(line)['output'] for line in written.read_text().splitlines()]
  assert theirs == ours and len(ours) == 1043   # CoLA's validation split
  assert set(ours) & {'entailment', 'not_entailment'}   # words of the run's training task
