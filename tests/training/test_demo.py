"""The README's main job, shortened: `t5x train --gin_file=demo.gin`, then eval and infer.

The demo's tasks share their inputs (tasks/demo.py), so accuracy far above a third
needs the task conditioning to work end to end: data task ids -> model -> decoding.
"""
import contextlib
import hashlib
import io
import json
import pathlib
import shutil

import pytest

from hyperprompt_t5x.cli import commands

STEPS = 80  # the full demo trains 150; the tasks are learnt by about step 75


@pytest.fixture(scope='module', autouse=True)
def _shared_compilation_cache(compilation_cache):
  """The persistent XLA cache of conftest.py for every test here."""
  return compilation_cache


def demo_argv(model_dir):
  return ['train', '--gin_file=demo.gin', f'--gin.MODEL_DIR={model_dir}',
          f'--gin.TRAIN_STEPS={STEPS}', f'--gin.EVAL_PERIOD={STEPS}',
          f'--gin.SAVE_PERIOD={STEPS}',
          # demo.gin's XLA flags would change the whole pytest process's XLA set-up.
          '--gin.XLA_FLAGS=None']


@pytest.fixture(scope='module')
def demo_console(tmp_path_factory):
  """(MODEL_DIR, console text) of one shortened demo run, shared by every test here."""
  model_dir = tmp_path_factory.mktemp('demo') / 'run'
  console = io.StringIO()
  with contextlib.redirect_stdout(console):
    assert commands.main(demo_argv(model_dir)) == 0
  return model_dir, console.getvalue()


@pytest.fixture(scope='module')
def demo_run(demo_console):
  return demo_console[0]


def snapshot(directory) -> dict:
  root = pathlib.Path(directory)
  return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob('*')) if p.is_file()}


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
  """--gin.MODEL_DIR alone is enough (the run's config.gin), in either quoting; stdout
  holds the results only (eval: the table; infer: nothing, the file has them)."""
  assert commands.main(['eval', f'--gin.MODEL_DIR={demo_run}']) == 0
  scored = json.loads((demo_run / f'eval_validation_{STEPS}.json').read_text())
  assert scored['step'] == STEPS and scored['average'] >= 90.0
  captured = capsys.readouterr()
  table = captured.out.splitlines()
  assert table[1].split() == ['task', 'metric', f'score@{STEPS}'], table
  assert table[-1].split() == ['average', f'{scored["average"]:.2f}']
  assert 'validation split, step' in captured.err and 'written' in captured.err
  out = tmp_path / 'predictions.jsonl'
  assert commands.main(['infer', f"--gin.MODEL_DIR='{demo_run}'",
                        f'--gin.INFER_OUTPUT_PATH={out}', '--gin.EVAL_MAX_EXAMPLES=10']) == 0
  captured = capsys.readouterr()
  assert captured.out == '' and f'wrote 30 predictions to {out}' in captured.err
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
  common = ['--gin_file=demo.gin', f'--gin.MODEL_DIR={demo_run}']
  assert commands.main(['infer', *common, f'--gin.INFER_OUTPUT_PATH={out}']) == 2  # no overwrite


def test_an_explicit_gin_file_of_another_model_is_one_line(demo_run, capsys):
  before = snapshot(demo_run)
  assert commands.main(['eval', '--gin_file=demo.gin', f'--gin.MODEL_DIR={demo_run}',
                        '--gin.METHOD=share']) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and 'holds checkpoints of a different model' in err, err
  assert "method: checkpoint 'global', config 'share'" in err
  assert snapshot(demo_run) == before


def test_analyze_command_writes_attention_mass(demo_run, capsys):
  assert commands.main(['analyze', f'--gin.MODEL_DIR={demo_run}',
                        '--gin.EVAL_MAX_EXAMPLES=20']) == 0
  out = json.loads((demo_run / 'analysis' / 'attention_mass.json').read_text())
  assert sorted(out) == ['hyperprompt_demo_has_a', 'hyperprompt_demo_max',
                         'hyperprompt_demo_min']
  for entry in out.values():
    assert entry['num_examples'] == 20
    for kind in ('encoder', 'decoder'):  # demo.gin: global, encoder + decoder prompts
      assert len(entry[kind]) == 2 and all(0.0 <= x <= 1.0 for x in entry[kind])
      assert len(entry['per_head'][kind][0]) == 4
  assert (demo_run / 'analysis' / 'attention_mass.png').stat().st_size > 1000
  # stdout: a header naming every column, then one labelled row per task and stack.
  lines = capsys.readouterr().out.splitlines()
  assert lines[0] == 'tasks hyperprompt_demo_*'
  assert lines[1].split() == ['task', 'attention', 'layer', '1', 'layer', '2']
  rows = {(l.split()[0], l.split()[1]): [float(x) for x in l.split()[2:]] for l in lines[2:]}
  assert len(rows) == 6
  assert rows[('max', 'decoder')] == pytest.approx(
      out['hyperprompt_demo_max']['decoder'], abs=5e-4)


# ----------------------------------------------------------------------------
# What the user sees: summary, progress, table, no-op, plots, Python API.
# ----------------------------------------------------------------------------


def test_console_summary_progress_and_table(demo_console):
  model_dir, out = demo_console
  lines = out.splitlines()
  summary = {line.split()[0]: line for line in lines[:12] if line.strip()}
  assert 'global (HyperPrompt-Global)' in summary['method']
  assert 'total' in out and 'added by task conditioning' in out and 'trainable' in out
  assert 'hyperprompt_demo: 0 hyperprompt_demo_max' in out
  assert '64 examples of 8 input + 2 target tokens' in out
  assert f'tensorboard --logdir {model_dir}' in out
  assert 'mesh data' in summary['devices']
  compiling = next(i for i, l in enumerate(lines) if l.startswith('compiling the train step'))
  compiled = next(i for i, l in enumerate(lines) if l.startswith('train step compiled in'))
  first_step = next(i for i, l in enumerate(lines) if l.startswith('step '))
  assert compiling < compiled < first_step
  progress = [l for l in lines if l.startswith('step ')]
  assert len(progress) == STEPS // 25 + 1 and all('ETA' in l for l in progress)
  assert any(l.startswith(f'saved checkpoint_{STEPS} (') for l in lines)
  assert any(l.startswith(f'eval at step {STEPS} (') for l in lines)
  start = next(i for i, l in enumerate(lines) if l.startswith('task '))
  table = lines[start:next(i for i, l in enumerate(lines) if l.startswith('average')) + 1]
  assert all(len(l) <= 80 for l in progress + table), [l for l in progress + table
                                                       if len(l) > 80]
  # Every number under a header that names it: the last eval's score, the best, its step.
  assert table[0].split() == ['task', 'metric', f'score@{STEPS}', 'best', 'score', 'at', 'step']
  best = json.loads((model_dir / 'best.json').read_text())
  for line in table[1:-1]:
    name, metric, score, best_score, step = line.split()
    assert metric == 'acc' and int(step) == best['tasks'][f'hyperprompt_demo_{name}']['step']
    assert float(best_score) == pytest.approx(
        best['tasks'][f'hyperprompt_demo_{name}']['score'], abs=0.01)
  assert any(l.startswith('plots: ') for l in lines)
  # The progress line's lr is the rate of the logged step (demo: 20 warm-up steps to
  # 0.003, so 0.003 at step 25); metrics.jsonl has the window's mean under its own name.
  assert progress[0].startswith('step 25/') and '  lr 0.003  ' in progress[0], progress[0]
  # One token definition: tokens/s = steps/s x BATCH_SIZE x (inputs + targets length).
  records = [json.loads(l) for l in (model_dir / 'metrics.jsonl').read_text().splitlines()]
  train = [r for r in records if 'loss' in r]
  assert train[0]['step'] == 25 and train[0]['learning_rate'] == pytest.approx(0.003)
  assert 0.001 < train[0]['learning_rate_mean'] < 0.0025  # 20 warm-up steps in the window
  for r in train:
    assert r['tokens_per_sec'] == pytest.approx(r['steps_per_sec'] * 64 * (8 + 2))
    assert 'num_tokens' not in r and r['target_tokens'] > 0
  assert json.loads((model_dir / 'model_config.json').read_text())['dtype'] == 'float32'


def test_finished_run_is_a_noop_that_writes_nothing(demo_run):
  before = snapshot(demo_run)
  console = io.StringIO()
  with contextlib.redirect_stdout(console):
    assert commands.main(demo_argv(demo_run)) == 0
  out = console.getvalue()
  assert out.startswith('Nothing to do'), out
  assert 'compil' not in out and 'method ' not in out
  best = json.loads((demo_run / 'best.json').read_text())
  assert 'average' in out and f'{best["average"]:.2f}' in out
  assert snapshot(demo_run) == before  # no event file, no metrics line, nothing


def test_plots_exist_are_pngs_and_follow_the_metrics(demo_run, tmp_path):
  plots = demo_run / 'plots'
  names = sorted(p.name for p in plots.iterdir())
  assert names == ['training.png'] + [f'validation_hyperprompt_demo_{t}.png'
                                      for t in ('has_a', 'max', 'min')]
  for name in names:
    assert (plots / name).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  copy = tmp_path / 'run'
  shutil.copytree(demo_run, copy)
  before = snapshot(copy / 'plots')
  with (copy / 'metrics.jsonl').open('a') as f:  # one more (partial) eval, as a live run
    f.write(json.dumps({'step': STEPS + 20, 'validation/hyperprompt_demo_max/accuracy': 12.5})
            + '\n{"step": 1')
  assert commands.main(['plot', f'--gin.MODEL_DIR={copy}']) == 0
  after = snapshot(copy / 'plots')
  assert after['validation_hyperprompt_demo_max.png'] != before[
      'validation_hyperprompt_demo_max.png']
  assert after['validation_hyperprompt_demo_min.png'] == before[
      'validation_hyperprompt_demo_min.png']


def test_python_api_predict_and_score(demo_run, capfd):
  import hyperprompt_t5x
  model = hyperprompt_t5x.load(str(demo_run))
  assert capfd.readouterr() == ('', '')  # load prints nothing unless verbose=True
  assert model.step == STEPS
  words = ['fbhde', 'cadg', 'hgb', 'bdfe']
  assert model.predict(words, task='hyperprompt_demo_max') == [max(w) for w in words]
  assert model.predict(words, task='hyperprompt_demo_min') == [min(w) for w in words]
  right = model.score(words, [min(w) for w in words], task='hyperprompt_demo_min')
  wrong = model.score(words, [max(w) for w in words], task='hyperprompt_demo_min')
  assert all(r > w for r, w in zip(right, wrong)) and all(r <= 0 for r in right)
  # One answer per text, in order: empty and blank texts get None.
  texts = ['', 'fbhde', '   ', '\t\n', 'cadg', '']
  assert model.predict(texts, task='hyperprompt_demo_max') == [
      None, 'h', None, None, 'g', None]
  assert model.predict([''], task='hyperprompt_demo_max') == [None]
  scores = model.score(texts, ['h'] * len(texts), task='hyperprompt_demo_max')
  assert [s is None for s in scores] == [True, False, True, True, False, True]
  assert scores[1] == pytest.approx(model.score(['fbhde'], ['h'], task='hyperprompt_demo_max')[0],
                                    abs=1e-5)
  assert capfd.readouterr() == ('', '')
  for call, error, message in [
      (lambda: model.predict(words, task='hyperprompt_demo_mni'), ValueError,
       "did you mean 'hyperprompt_demo_min'"),
      (lambda: model.predict(['fbhde', 'abcdefgh'], task='hyperprompt_demo_max'), ValueError,
       r'texts\[1\] is 9 tokens .* longer than the run.s input length 8'),
      (lambda: model.predict('fbhde', task='hyperprompt_demo_max'), TypeError,
       'texts must be a list'),
      (lambda: model.predict(['a', 3], task='hyperprompt_demo_max'), TypeError,
       r'texts\[1\] is int 3'),
      (lambda: model.predict(['a'], task=0), TypeError, 'task must be a task name'),
      (lambda: model.score(['a', 'b'], ['h', None], task='hyperprompt_demo_max'), TypeError,
       r'targets\[1\] is NoneType'),
      (lambda: model.score(['a', 'b'], ['h'], task='hyperprompt_demo_max'), ValueError,
       '2 texts, 1 targets'),
      (lambda: hyperprompt_t5x.load(str(demo_run), checkpoint_step='75'), TypeError,
       'checkpoint_step must be an integer')]:
    with pytest.raises(error, match=message):
      call()
  assert len(model.predict(['abcdefgh'], task='hyperprompt_demo_max', truncate=True)) == 1
  capfd.readouterr()
  hyperprompt_t5x.load(str(demo_run / f'checkpoint_{STEPS}'), verbose=True)
  out, err = capfd.readouterr()
  assert out == '' and f'loaded {demo_run} at step {STEPS}' in err


def test_infer_on_the_users_own_texts(demo_run, tmp_path, capsys):
  """stdout is JSON lines only, one per input line (blank lines too); talk on stderr."""
  before = snapshot(demo_run)
  lines = ['fbhde', '', 'cadg', '   ', 'hgb']
  txt = tmp_path / 'words.txt'
  txt.write_text('\n'.join(lines) + '\n')
  common = ['infer', f'--gin.MODEL_DIR={demo_run}', '--task=hyperprompt_demo_has_a']
  assert commands.main(common + [f'--input_file={txt}']) == 0
  captured = capsys.readouterr()
  rows = [json.loads(l) for l in captured.out.splitlines()]  # every stdout line is JSON
  assert [r['input'] for r in rows] == lines
  assert [r.get('prediction') for r in rows] == [
      ('y' if 'a' in w else 'n') if w.strip() else None for w in lines]
  assert [r.get('error') for r in rows] == [None, 'empty input', None, 'empty input', None]
  assert f'loaded {demo_run} at step {STEPS}' in captured.err
  jsonl = tmp_path / 'words.jsonl'
  jsonl.write_text('\n'.join(json.dumps({'inputs': w}) if w else '' for w in lines))
  # The quoted form of T5X (--gin.MODEL_DIR="'/x'") means the same directory.
  assert commands.main(['infer', f"--gin.MODEL_DIR='{demo_run}'",
                        '--task=hyperprompt_demo_has_a', f'--input_file={jsonl}']) == 0
  assert [json.loads(l) for l in capsys.readouterr().out.splitlines()] == [
      dict(r, input={'inputs': r['input']} if r['input'] else '') for r in rows[:3]] + [
      {'input': {'inputs': '   '}, 'error': 'empty input', 'task': 'hyperprompt_demo_has_a'},
      dict(rows[4], input={'inputs': 'hgb'})]
  empty = tmp_path / 'empty.txt'
  empty.write_text('')
  for extra, message in [([f'--input_file={empty}'], f'--input_file {empty} is empty'),
                         ([f'--input_file={txt}', '--task=nope'], "unknown task 'nope'")]:
    assert commands.main(common + extra) == 2
    captured = capsys.readouterr()
    errors = [l for l in captured.err.splitlines() if l.startswith('error:')]
    assert len(errors) == 1 and message in errors[0], captured.err
    assert captured.out == ''
  assert snapshot(demo_run) == before
