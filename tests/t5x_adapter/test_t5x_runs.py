"""Real T5X (`python -m t5x.train`) with this package's gin files.

One short T5X training run (a subprocess of about a minute) serves every test
here: the README's T5X fine-tuning config (`hyperprompt_small.gin`, packed training
rows: PACK = True) from the real tiny T5X checkpoint. T5X restores the backbone,
step 0 calibrates the prompt scale, and the project reads the checkpoints T5X wrote (parameters equal
T5X's own reader's; `hyperprompt-t5x eval` scores them).
"""
import json
import re

import numpy as np
import pytest

try:
  import t5x  # noqa: F401  pylint: disable=unused-import
except ImportError:
  pytest.skip('t5x not importable (install it with scripts/install_t5x.sh)',
              allow_module_level=True)

from hyperprompt_t5x.cli import commands  # noqa: E402

from conftest import run_t5x  # noqa: E402

T5X_STEPS = 3
DEMO_TASKS = ('hyperprompt_demo_has_a', 'hyperprompt_demo_max', 'hyperprompt_demo_min')


@pytest.fixture(scope='module', autouse=True)
def _shared_compilation_cache(compilation_cache):
  return compilation_cache


SHAPES = dict(emb_dim=8, num_heads=4, head_dim=3, num_encoder_layers=2, num_decoder_layers=2,
              mlp_dim=16)  # test_t5_tiny's (its vocabulary is T5's 32128, model.gin's default)
CONDITIONING = dict(METHOD="'global'", NUM_TASKS=3, PROMPT_LENGTH=4, BOTTLENECK=8)

_RATIO_LINE = re.compile(r'prompt/real key-value norm ratio per block on the first batch: '
                         r'(.*?); after rescaling: (.*)$', re.M)


@pytest.fixture(scope='module')
def t5x_run(tmp_path_factory, t5x_tiny_checkpoint):
  """`python -m t5x.train --gin_file=hyperprompt_small.gin`, the README's T5X fine-tuning,
  on the real tiny T5X checkpoint: its shapes, and the demo mixture over the GLUE one
  (which needs TFDS); without end-of-training evaluations (T5X's seqio.Evaluator on
  these tasks runs in test_t5x_project_checkpoint.py, `t5x.eval`)."""
  root = tmp_path_factory.mktemp('t5x_finetune')
  initial = root / 'checkpoint_0'  # T5X's layout: checkpoint_<step>/checkpoint
  initial.mkdir()
  (initial / 'checkpoint').symlink_to(t5x_tiny_checkpoint)
  model_dir = root / 'run'
  log = run_t5x('train', 'hyperprompt_small.gin', root, f"MODEL_DIR='{model_dir}'",
                f"INITIAL_CHECKPOINT_PATH='{initial}'",
                "MIXTURE_OR_TASK_NAME='hyperprompt_demo'",
                "TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 2}",  # PACK: several per row
                f'TRAIN_STEPS={T5X_STEPS}', 'BATCH_SIZE=8', 'RANDOM_SEED=0',
                'train/utils.DatasetConfig.seed=0',
                'train.infer_eval_dataset_cfg=None', 'train.train_eval_dataset_cfg=None',
                *[f'{k}={v}' for k, v in CONDITIONING.items()],
                *[f'network.T5Config.{k}={v}' for k, v in SHAPES.items()])
  return model_dir, log


def test_t5x_fine_tunes_a_t5x_checkpoint_and_the_project_reads_its_checkpoints(t5x_run):
  model_dir, log = t5x_run
  assert f'[{T5X_STEPS}] collection=train' in log
  # hyperprompt_small.gin sets PACK = True: T5X's train batches are packed rows (one task
  # each), with the targets row packing.row_lengths gives (max(2, 32 // 8) = 4).
  for feature, shape in (('encoder_segment_ids', '[8, 32]'), ('decoder_positions', '[8, 4]'),
                         ('task_ids', '[8]')):
    assert re.search(rf'feature: {feature} \s+shape: {re.escape(shape)}', log), feature
  # T5X saved its pre-loop state (step 0, the restored backbone, fresh conditioning)
  # and the trained one.
  assert_project_reads_t5x_params(model_dir / 'checkpoint_0')
  assert_project_reads_t5x_params(model_dir / f'checkpoint_{T5X_STEPS}')


def _ratios(text):
  """'decoder k 0.41 0.70 | v 0.56 0.61; encoder k ...' -> {kind/name: [per layer]}."""
  out = {}
  for part in text.split('; '):
    kind, rest = part.split(' k ')
    keys, values = rest.split(' | v ')
    out[f'{kind}/key'] = [float(x) for x in keys.split()]
    out[f'{kind}/value'] = [float(x) for x in values.split()]
  return out


def test_t5x_fine_tuning_calibrates_the_prompt_scale_at_its_first_step(t5x_run):
  """Step 0 on the restored backbone logs the prompt/real norm ratios and brings them to 1
  (t5x_model.prompt_scale_trainer, bound in gin/t5x/finetune.gin)."""
  _, log = t5x_run
  (match,) = _RATIO_LINE.finditer(log)
  before, after = _ratios(match.group(1)), _ratios(match.group(2))
  assert sorted(before) == sorted(after) == ['decoder/key', 'decoder/value', 'encoder/key',
                                             'encoder/value']
  assert any(abs(x - 1) > 0.1 for r in before.values() for x in r), before
  # Global fits one layer embedding per block: it sets the block's prompt scale (the
  # geometric mean of its key and value ratios is 1), not the balance of keys against
  # values (prompt_scale.py), which stays as the block's before-ratios have it.
  for kind in ('encoder', 'decoder'):
    k, v = np.asarray(after[f'{kind}/key']), np.asarray(after[f'{kind}/value'])
    np.testing.assert_allclose(np.sqrt(k * v), 1.0, atol=0.04, err_msg=match.group(0))
    np.testing.assert_allclose(np.concatenate([k, v]), 1.0, atol=0.15, err_msg=match.group(0))


def assert_project_reads_t5x_params(ckpt):
  """checkpoints.load_t5x_params equals orbax's plain restore of T5X's `state` item."""
  import orbax.checkpoint as ocp
  from hyperprompt_t5x.checkpoints import pretrained
  ours = pretrained.flatten_params(pretrained.load_t5x_params(str(ckpt)))
  assert any(k.startswith('task_conditioning/') for k in ours)
  stored = ocp.PyTreeCheckpointer().restore(str(ckpt / 'state'))
  theirs = pretrained.flatten_params(stored['target'])
  assert sorted(ours) == sorted(theirs)
  for k, v in theirs.items():
    np.testing.assert_array_equal(ours[k], np.asarray(v, np.float32), err_msg=k)


def test_project_eval_reads_a_t5x_checkpoint(t5x_run):
  model_dir, _ = t5x_run
  assert commands.main(['eval', '--gin_file=demo.gin', f'--gin.MODEL_DIR={model_dir}',
                   '--gin.XLA_FLAGS=None', "--gin.METHOD='global'",
                   *[f'--gin.{k}={v}' for k, v in CONDITIONING.items() if k != 'METHOD'],
                   '--gin_bindings=T5Config.vocab_size = 32128',  # and conditioning.gin's:
                   '--gin_bindings=T5Config.task_embed_dim = 32',
                   '--gin_bindings=T5Config.layer_task_dim = 32',
                   *[f'--gin_bindings=T5Config.{k} = {v}' for k, v in SHAPES.items()]]) == 0
  scored = json.loads((model_dir / f'eval_validation_{T5X_STEPS}.json').read_text())
  assert scored['step'] == T5X_STEPS and sorted(scored['tasks']) == list(DEMO_TASKS)
