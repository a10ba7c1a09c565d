"""Real T5X (`python -m t5x.train`) with this package's gin files.

One short T5X training run (a subprocess of about a minute) serves every test
here: T5X trains the model, and the project reads the checkpoint T5X wrote
(parameters equal T5X's own reader's; `hyperprompt-t5x eval` scores it).
"""
import json

import numpy as np
import pytest

try:
  import t5x  # noqa: F401  pylint: disable=unused-import
except ImportError:
  pytest.skip('t5x not importable (install it with ../shared/vendor/install-t5x.sh)',
              allow_module_level=True)

from hyperprompt_t5x import cli  # noqa: E402

from conftest import run_t5x  # noqa: E402

T5X_STEPS = 3
DEMO_TASKS = ('hyperprompt_demo_has_a', 'hyperprompt_demo_max', 'hyperprompt_demo_min')


@pytest.fixture(scope='module', autouse=True)
def _shared_compilation_cache(compilation_cache):
  return compilation_cache


@pytest.fixture(scope='module')
def t5x_run(tmp_path_factory):
  """A few T5X training steps of the demo model from scratch (T5X's own checkpoint).

  Without demo.gin's end-of-training evaluations (~10 s): T5X's seqio.Evaluator
  on these tasks runs in test_t5x_project_checkpoint.py (`t5x.eval`).
  """
  model_dir = tmp_path_factory.mktemp('t5x_train') / 'run'
  log = run_t5x('train', 'demo.gin', model_dir.parent, f"MODEL_DIR='{model_dir}'",
                f'TRAIN_STEPS={T5X_STEPS}', 'train.infer_eval_dataset_cfg=None',
                'train.train_eval_dataset_cfg=None')
  return model_dir, log


def test_t5x_trains_the_model_and_the_project_reads_its_checkpoint(t5x_run):
  model_dir, log = t5x_run
  assert f'[{T5X_STEPS}] collection=train' in log
  assert_project_reads_t5x_params(model_dir / f'checkpoint_{T5X_STEPS}')


def assert_project_reads_t5x_params(ckpt):
  """checkpoints.load_t5x_params equals orbax's plain restore of T5X's `state` item."""
  import orbax.checkpoint as ocp
  from hyperprompt_t5x import checkpoints
  ours = checkpoints.flatten_params(checkpoints.load_t5x_params(str(ckpt)))
  assert any(k.startswith('task_conditioning/') for k in ours)
  stored = ocp.PyTreeCheckpointer().restore(str(ckpt / 'state'))
  theirs = checkpoints.flatten_params(stored['target'])
  assert sorted(ours) == sorted(theirs)
  for k, v in theirs.items():
    np.testing.assert_array_equal(ours[k], np.asarray(v, np.float32), err_msg=k)


def test_project_eval_reads_a_t5x_checkpoint(t5x_run):
  model_dir, _ = t5x_run
  assert cli.main(['eval', '--gin_file=demo.gin', f'--gin.MODEL_DIR={model_dir}',
                   '--gin.XLA_FLAGS=None']) == 0
  scored = json.loads((model_dir / f'eval_validation_{T5X_STEPS}.json').read_text())
  assert scored['step'] == T5X_STEPS and sorted(scored['tasks']) == list(DEMO_TASKS)
