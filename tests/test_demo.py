"""The README's main job, shortened: `t5x train --gin_file=demo.gin`, then eval and infer.

The demo's tasks share their inputs (tasks/demo.py), so accuracy far above a third
needs the task conditioning to work end to end: data task ids -> model -> decoding.
"""
import json

import pytest

from hyperprompt_t5x import cli

STEPS = 80  # the full demo trains 150; the tasks are learnt by about step 75


@pytest.fixture(scope='module', autouse=True)
def _shared_compilation_cache(compilation_cache):
  """The persistent XLA cache of conftest.py for every test here."""
  return compilation_cache


@pytest.fixture(scope='module')
def demo_run(tmp_path_factory):
  model_dir = tmp_path_factory.mktemp('demo') / 'run'
  argv = ['train', '--gin_file=demo.gin', f'--gin.MODEL_DIR={model_dir}',
          f'--gin.TRAIN_STEPS={STEPS}', f'--gin.EVAL_PERIOD={STEPS}',
          f'--gin.SAVE_PERIOD={STEPS}',
          # demo.gin's XLA flags would change the whole pytest process's XLA set-up.
          '--gin.XLA_FLAGS=None']
  assert cli.main(argv) == 0
  return model_dir


def test_demo_learns_every_task_far_above_chance(demo_run, capsys):
  best = json.loads((demo_run / 'best.json').read_text())
  tasks = best['tasks']
  assert sorted(tasks) == ['hyperprompt_demo_has_a', 'hyperprompt_demo_max',
                           'hyperprompt_demo_min']
  # Blind to the task id a model is right on at most ~1/3 of the mixture; per task,
  # the majority answer gets <= 1/8 (max/min) or ~1/2 (has_a).
  for name, entry in tasks.items():
    assert entry['score'] >= 90.0, (name, entry)
    assert entry['step'] == STEPS
  assert best['average'] >= 90.0
  records = [json.loads(l) for l in (demo_run / 'metrics.jsonl').read_text().splitlines()]
  assert any('validation/average_score' in r for r in records)
  logged = [r['step'] for r in records if 'loss' in r]
  assert logged == sorted(set(logged))  # one object per logged step
  assert set(range(25, STEPS + 1, 25)) | {STEPS} <= set(logged)  # every LOG_PERIOD and the end


def test_eval_and_infer_commands(demo_run, tmp_path, capsys):
  common = ['--gin_file=demo.gin', f'--gin.MODEL_DIR={demo_run}']
  assert cli.main(['eval', *common]) == 0
  scored = json.loads((demo_run / f'eval_validation_{STEPS}.json').read_text())
  assert scored['step'] == STEPS and scored['average'] >= 90.0
  out = tmp_path / 'predictions.jsonl'
  assert cli.main(['infer', *common, f'--gin.INFER_OUTPUT_PATH={out}',
                   '--gin.EVAL_MAX_EXAMPLES=10']) == 0
  rows = [json.loads(l) for l in out.read_text().splitlines()]
  assert len(rows) == 30
  assert set(rows[0]) == {'inputs', 'target', 'prediction', 'task'}
  assert sum(r['prediction'] == r['target'] for r in rows) >= 27
  # The same input word gets each task's own answer.
  by_input = {}
  for r in rows:
    by_input.setdefault(r['inputs'], {})[r['task']] = r['prediction']
  word, answers = next((w, a) for w, a in by_input.items() if len(a) == 3)
  assert answers['hyperprompt_demo_max'] == max(word)
  assert answers['hyperprompt_demo_min'] == min(word)
  assert cli.main(['infer', *common, f'--gin.INFER_OUTPUT_PATH={out}']) == 2  # no overwrite


def test_analyze_command_writes_attention_mass(demo_run, capsys):
  common = ['--gin_file=demo.gin', f'--gin.MODEL_DIR={demo_run}']
  assert cli.main(['analyze', *common, '--gin.EVAL_MAX_EXAMPLES=20']) == 0
  out = json.loads((demo_run / 'analysis' / 'attention_mass.json').read_text())
  assert sorted(out) == ['hyperprompt_demo_has_a', 'hyperprompt_demo_max',
                         'hyperprompt_demo_min']
  for entry in out.values():
    assert entry['num_examples'] == 20
    for kind in ('encoder', 'decoder'):  # demo.gin: global, encoder + decoder prompts
      assert len(entry[kind]) == 2 and all(0.0 <= x <= 1.0 for x in entry[kind])
      assert len(entry['per_head'][kind][0]) == 4
  assert (demo_run / 'analysis' / 'attention_mass.png').stat().st_size > 1000
