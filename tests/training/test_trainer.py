"""The train loop through the CLI: INITIAL_CHECKPOINT_PATH, freeze modes, and bad input
that must fail with one clear error and leave MODEL_DIR as it was (kills, signals and
damaged checkpoints: test_reliability.py).

Runs use gin/demo.gin (a tiny byte-vocabulary model on the offline demo mixture) with
few steps; compiled programs are shared through JAX's persistent compilation cache.
"""
import hashlib
import pathlib
import sys
import shutil

import numpy as np
import pytest

from hyperprompt_t5x.checkpoints import pretrained
from hyperprompt_t5x.cli import commands
from hyperprompt_t5x.training import divergence
from hyperprompt_t5x.run import run_setup

REPO = next(p for p in pathlib.Path(__file__).resolve().parents if (p / 'setup.py').is_file())
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))
from bench.kill_harness import demo_args  # noqa: E402  (the demo's train command line)

pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning')

# The real T5X checkpoint's shapes (docs/METHODS.md, Parameter tree; tests/conftest.py).
T5X_TINY = ['T5Config.vocab_size = 32128', 'T5Config.emb_dim = 8', 'T5Config.num_heads = 4',
            'T5Config.head_dim = 3', 'T5Config.num_encoder_layers = 2',
            'T5Config.num_decoder_layers = 2', 'T5Config.mlp_dim = 16']


@pytest.fixture(scope='module', autouse=True)
def _shared_compilation_cache(compilation_cache):
  """The persistent XLA cache of conftest.py for every test here."""
  return compilation_cache


def snapshot(directory) -> dict:
  """relative path -> sha1 of every file under `directory`."""
  root = pathlib.Path(directory)
  return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob('*')) if p.is_file()}


def params_of(model_dir, step) -> dict:
  """Flat name -> array of MODEL_DIR/checkpoint_<step> (read back from the orbax files)."""
  tree = pretrained.load_t5x_params(str(pathlib.Path(model_dir) / f'checkpoint_{step}'))
  return pretrained.flatten_params(tree)


@pytest.fixture(scope='module')
def trained_dir(tmp_path_factory):
  """MODEL_DIR after 2 demo steps, checkpoint_2 saved."""
  model_dir = tmp_path_factory.mktemp('trained') / 'run'
  assert commands.run(demo_args(model_dir)) == 0
  assert (model_dir / 'checkpoint_2').is_dir()
  return model_dir


def copy_of(trained_dir, tmp_path):
  target = tmp_path / 'run'
  shutil.copytree(trained_dir, target)
  return target


# ----------------------------------------------------------------------------
# What a run leaves in MODEL_DIR.
# ----------------------------------------------------------------------------


def test_run_writes_metrics_config_and_tensorboard(trained_dir):
  import json
  lines = (trained_dir / 'metrics.jsonl').read_text().splitlines()
  records = [json.loads(l) for l in lines]
  assert [r['step'] for r in records] == [1, 2]
  for r in records:
    assert np.isfinite(r['loss']) and {'learning_rate', 'steps_per_sec',
                                       'tokens_per_sec'} <= set(r)
  config = (trained_dir / 'config.gin').read_text()
  assert "MODEL_DIR = '" in config and 'TRAIN_STEPS = 2' in config
  assert list((trained_dir / 'train').glob('events.out.tfevents.*'))


def test_rerun_with_other_config_keeps_config_history(trained_dir, tmp_path):
  model_dir = copy_of(trained_dir, tmp_path)
  before = (model_dir / 'config.gin').read_text()
  assert commands.run(demo_args(model_dir, steps=3, save=3)) == 0
  assert (model_dir / 'config.gin').read_text() == before  # never overwritten
  assert 'TRAIN_STEPS = 3' in (model_dir / 'config_2.gin').read_text()
  assert (model_dir / 'checkpoint_3').is_dir()


# ----------------------------------------------------------------------------
# INITIAL_CHECKPOINT_PATH and freeze modes.
# ----------------------------------------------------------------------------


@pytest.fixture(scope='module')
def from_t5x(tmp_path_factory, t5x_tiny_checkpoint):
  """3 steps from the real T5X checkpoint, training only the task conditioning."""
  model_dir = tmp_path_factory.mktemp('from_t5x') / 'run'
  args = demo_args(model_dir, f'--gin.INITIAL_CHECKPOINT_PATH={t5x_tiny_checkpoint}',
                   "--gin.FREEZE='conditioning'",
                   *[f'--gin_bindings={b}' for b in T5X_TINY], steps=3, save=3)
  assert commands.run(args) == 0
  return model_dir


def _split(flat):
  backbone = {k: v for k, v in flat.items() if not k.startswith('task_conditioning')}
  conditioning = {k: v for k, v in flat.items() if k.startswith('task_conditioning')}
  return backbone, conditioning


@pytest.fixture(scope='module')
def t5x_start(t5x_tiny_checkpoint, tmp_path_factory):
  """Params `train` starts from: with INITIAL_CHECKPOINT_PATH, and without (fresh)."""
  import jax
  from hyperprompt_t5x import gin_config
  gin_config.parse(['demo.gin'], macros=[('MODEL_DIR', '/tmp/unused')], bindings=T5X_TINY)
  config = gin_config.model_config()

  def start(path):
    run = run_setup.build_run(model_dir=str(tmp_path_factory.mktemp('start')), config=config,
                              mixture_or_task_name='hyperprompt_demo',
                              task_feature_lengths={'inputs': 8, 'targets': 2},
                              settings=run_setup.OptimizerSettings(optimizer='adamw'),
                              initial_checkpoint_path=path)
    return pretrained.flatten_params(jax.device_get(run.state.params))

  previous = jax.config.jax_default_prng_impl
  jax.config.update('jax_default_prng_impl', 'unsafe_rbg')  # demo.gin's USE_HARDWARE_RNG
  try:
    return start(str(t5x_tiny_checkpoint)), start(None)
  finally:
    jax.config.update('jax_default_prng_impl', previous)


def _expected_backbone(t5x_tiny_checkpoint):
  tree = pretrained.load_t5x_params(str(t5x_tiny_checkpoint))
  return {k: np.asarray(v, np.float32) for k, v in pretrained.flatten_params(tree).items()}


def test_initial_checkpoint_gives_backbone_and_fresh_conditioning(t5x_start,
                                                                  t5x_tiny_checkpoint):
  started, fresh = t5x_start
  expected = _expected_backbone(t5x_tiny_checkpoint)
  backbone, conditioning = _split(started)
  assert sorted(backbone) == sorted(expected)
  for name, value in expected.items():
    np.testing.assert_array_equal(backbone[name], value, err_msg=name)
  assert conditioning, 'HyperPrompt-Global has task_conditioning params'
  for name, value in conditioning.items():
    np.testing.assert_array_equal(value, fresh[name], err_msg=name)
  # The fresh backbone is not the checkpoint's: the comparison above can fail.
  assert any(not np.array_equal(fresh[n], v) for n, v in expected.items())


def test_freeze_conditioning_keeps_backbone_bit_identical(from_t5x, t5x_start,
                                                          t5x_tiny_checkpoint):
  started, _ = t5x_start
  expected = _expected_backbone(t5x_tiny_checkpoint)
  backbone, conditioning = _split(params_of(from_t5x, 3))
  assert sorted(backbone) == sorted(expected)
  for name, value in expected.items():
    np.testing.assert_array_equal(backbone[name], value, err_msg=name)
  # The conditioning did train (3 steps moved it away from where it started).
  assert any(not np.array_equal(v, started[n]) for n, v in conditioning.items())


def test_freeze_all_trains_backbone(trained_dir, tmp_path):
  """Control for the test above: with FREEZE='all' the backbone moves."""
  model_dir = copy_of(trained_dir, tmp_path)
  assert commands.run(demo_args(model_dir, steps=3, save=1)) == 0
  before, after = params_of(model_dir, 2), params_of(model_dir, 3)
  moved = [n for n in before if not n.startswith('task_conditioning')
           and not np.array_equal(before[n], after[n])]
  assert moved


# ----------------------------------------------------------------------------
# Bad input: one clear error, MODEL_DIR untouched.
# ----------------------------------------------------------------------------


def test_model_dir_of_a_different_model(trained_dir, tmp_path):
  model_dir = copy_of(trained_dir, tmp_path)
  before = snapshot(model_dir)
  with pytest.raises(ValueError, match='different model') as e:
    commands.run(demo_args(model_dir, '--gin_bindings=T5Config.emb_dim = 32', steps=4))
  assert 'emb_dim' in str(e.value)
  assert snapshot(model_dir) == before


def test_model_dir_of_a_different_method(trained_dir, tmp_path):
  model_dir = copy_of(trained_dir, tmp_path)
  before = snapshot(model_dir)
  with pytest.raises(ValueError, match='different model'):
    commands.run(demo_args(model_dir, "--gin_bindings=T5Config.method = 'share'", steps=4))
  assert snapshot(model_dir) == before


def test_mixture_task_count_differs_from_num_tasks(tmp_path):
  model_dir = tmp_path / 'run'
  with pytest.raises(ValueError, match='NUM_TASKS') as e:
    commands.run(demo_args(model_dir, '--gin.NUM_TASKS=4'))
  assert '3 tasks' in str(e.value) and 'num_tasks=4' in str(e.value)
  assert not model_dir.exists()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(trained_dir, tmp_path):
  model_dir = copy_of(trained_dir, tmp_path)
  good = {k: v for k, v in snapshot(model_dir).items() if k.startswith('checkpoint_2')}
  with pytest.raises(divergence.TrainingDivergedError, match='checkpoint_2') as e:
    commands.run(demo_args(model_dir, '--gin.LEARNING_RATE=1e39', "--gin.LR_SCHEDULE='constant'",
                      steps=6, save=1))
  assert 'nan' in str(e.value).lower() or 'inf' in str(e.value).lower()
  after = snapshot(model_dir)
  assert {k: v for k, v in after.items() if k.startswith('checkpoint_2')} == good
  steps = sorted(int(p.name.split('_')[1]) for p in model_dir.glob('checkpoint_*'))
  assert steps and steps[-1] <= 3, steps  # nothing saved after the loss went non-finite
  for step in steps:
    assert all(np.isfinite(v).all() for v in params_of(model_dir, step).values()), step
