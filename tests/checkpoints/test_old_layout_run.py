"""A run written by the package's earlier one-folder layout still loads, evaluates and
resumes.

tests/data_fixtures/old_layout_run is a MODEL_DIR written by `hyperprompt-t5x train`
when every module sat at the top of the package (demo.gin shrunk to emb 8, one layer
per stack, 2 steps; checkpoint_2, config.gin, model_config.json, best.json,
metrics.jsonl). Its config.gin names the configurables `train`, `evaluate`, `infer`,
`analyze` and `T5Config`, which must keep resolving.
"""
import json
import pathlib
import shutil

import numpy as np
import pytest

import hyperprompt_t5x
from hyperprompt_t5x.checkpoints import pretrained
from hyperprompt_t5x.cli import commands
from hyperprompt_t5x import optim
from hyperprompt_t5x.model import network
from hyperprompt_t5x.run import train_state

FIXTURE = (next(p for p in pathlib.Path(__file__).resolve().parents if (p / 'setup.py').is_file())
           / 'tests' / 'data_fixtures' / 'old_layout_run')

pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning')


@pytest.fixture(scope='module', autouse=True)
def _shared_compilation_cache(compilation_cache):
  return compilation_cache


@pytest.fixture
def old_run(tmp_path) -> pathlib.Path:
  """A writable copy of the old run (the fixture itself is never written)."""
  return pathlib.Path(shutil.copytree(FIXTURE, tmp_path / 'run'))


@pytest.fixture
def no_training_objects(monkeypatch):
  """Inference (load, eval, infer, analyze) builds no optimizer, schedule or train state."""
  def refuse(*args, **kwargs):
    raise AssertionError('inference built an optimizer, schedule or train state')
  for module, name in ((optim, 'make_optimizer'), (optim, 'make_schedule'),
                       (train_state, 'state_shardings_for'),
                       (train_state, 'create_train_state')):
    monkeypatch.setattr(module, name, refuse)


def _args(command, model_dir, *extra):
  return [command, f'--gin_file={model_dir / "config.gin"}',
          f'--gin.MODEL_DIR={str(model_dir)!r}', *extra]


def test_old_run_loads_and_predicts(old_run, no_training_objects):
  model = hyperprompt_t5x.load(str(old_run))
  assert model.step == 2
  saved = pretrained.flatten_params(pretrained.load_t5x_params(str(old_run / 'checkpoint_2')))
  got = pretrained.flatten_params(model.params)
  assert sorted(got) == sorted(saved)
  for name, value in saved.items():
    np.testing.assert_array_equal(np.asarray(got[name]), value, err_msg=name)
  [prediction] = model.predict(['fbhde'], task='hyperprompt_demo_max')
  assert isinstance(prediction, str)


def test_old_run_evaluates(old_run, no_training_objects):
  assert commands.run(_args('eval', old_run, '--gin.EVAL_MAX_EXAMPLES=8')) == 0
  written = json.loads((old_run / 'eval_validation_2.json').read_text())
  assert set(written['tasks']) == {'hyperprompt_demo_max', 'hyperprompt_demo_min',
                                   'hyperprompt_demo_has_a'}


def test_old_run_resumes_training(old_run):
  before = pretrained.flatten_params(
      pretrained.load_t5x_params(str(old_run / 'checkpoint_2')))
  assert commands.run(_args('train', old_run, '--gin.TRAIN_STEPS=3',
                            '--gin.EVAL_PERIOD=None')) == 0
  after = pretrained.flatten_params(
      pretrained.load_t5x_params(str(old_run / 'checkpoint_3')))
  assert sorted(after) == sorted(before)
  assert any(not np.array_equal(after[k], before[k]) for k in before)  # one step taken
  steps = [json.loads(line)['step'] for line in
           (old_run / 'metrics.jsonl').read_text().splitlines()
           if 'loss' in json.loads(line)]
  assert steps == [1, 2, 3]  # the old lines kept, the resumed step appended once


# Resuming with a changed config (documented in run/model_dir_files.py): a field of
# T5Config.RUNTIME_FIELDS may change, any other field is refused before anything is written.

def test_resume_with_a_changed_runtime_field_trains_on(old_run):
  assert 'embedding_lookup' in network.T5Config.RUNTIME_FIELDS
  assert commands.run(_args('train', old_run, '--gin.TRAIN_STEPS=3', '--gin.EVAL_PERIOD=None',
                            "--gin_bindings=T5Config.embedding_lookup = 'one_hot'")) == 0
  assert (old_run / 'checkpoint_3').is_dir()


@pytest.mark.parametrize('binding', ['T5Config.emb_dim = 16', 'T5Config.prompt_length = 3'])
def test_resume_with_a_changed_shape_field_is_refused(old_run, binding):
  field = binding.split('.')[1].split(' ')[0]
  assert field not in network.T5Config.RUNTIME_FIELDS
  before = {p: p.stat().st_mtime_ns for p in old_run.rglob('*')}
  with pytest.raises(ValueError, match=f'different model: {field}'):
    commands.run(_args('train', old_run, '--gin.TRAIN_STEPS=3', f'--gin_bindings={binding}'))
  assert {p: p.stat().st_mtime_ns for p in old_run.rglob('*')} == before
