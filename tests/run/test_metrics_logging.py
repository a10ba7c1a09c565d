"""metrics.jsonl holds each step once per kind of record, also across kills and resumes."""
import io
import json

from hyperprompt_t5x.run import metrics_logging


def _logger(model_dir):
  return metrics_logging.MetricsLogger(str(model_dir), tensorboard=False, stream=io.StringIO())


def _records(model_dir):
  return [json.loads(l) for l in (model_dir / 'metrics.jsonl').read_text().splitlines()]


def test_resume_does_not_repeat_steps_and_drops_a_cut_line(tmp_path):
  first = _logger(tmp_path)
  for step in (1, 2, 3):
    first.write(step, {'loss': float(step)})
  first.write(2, {'validation/rte/accuracy': 50.0})
  first.close()
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 4, "loss": 4.')  # killed mid-line
  resumed = _logger(tmp_path)  # resumed from checkpoint_2: steps 3 and 4 come again
  resumed.write(2, {'validation/rte/accuracy': 99.0})  # the eval of step 2 again
  for step in (3, 4, 5):
    resumed.write(step, {'loss': 10.0 * step})
  resumed.write(4, {'validation/rte/accuracy': 75.0})
  records = _records(tmp_path)
  train = [(r['step'], r['loss']) for r in records if 'loss' in r]
  evals = [(r['step'], r['validation/rte/accuracy']) for r in records if 'loss' not in r]
  assert train == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]
  assert evals == [(2, 50.0), (4, 75.0)]  # the first record of a step is kept


def test_non_chief_writes_nothing(tmp_path):
  logger = metrics_logging.MetricsLogger(str(tmp_path), tensorboard=False, is_chief=False)
  logger.write(1, {'loss': 1.0})
  assert not (tmp_path / 'metrics.jsonl').exists()


def test_status_lines_go_where_the_command_says(capsys):
  metrics_logging.log('to stdout')
  with metrics_logging.talking_to('stderr'):
    metrics_logging.log('to stderr')
    with metrics_logging.talking_to(None):
      metrics_logging.log('nowhere')
    metrics_logging.log('stderr again')
  metrics_logging.log('stdout again')
  captured = capsys.readouterr()
  assert captured.out == 'to stdout\nstdout again\n'
  assert captured.err == 'to stderr\nstderr again\n'


def test_progress_shows_the_learning_rate_of_the_logged_step(tmp_path):
  """Warm-up over 20 steps to 0.003: at step 25 the rate is 0.003, the window's mean
  (steps 1..25) is lower and goes to metrics.jsonl as learning_rate_mean."""
  stream = io.StringIO()
  logger = metrics_logging.MetricsLogger(str(tmp_path), tensorboard=False, stream=stream)
  schedule = lambda step: 0.003 * min(1.0, (step + 1) / 20)
  train_log = metrics_logging.TrainLog(logger, schedule=schedule, start_step=0, total_steps=50,
                                       tokens_per_step=10)
  fetched = [(s, {'loss': 1.0, 'learning_rate': schedule(s)}) for s in range(25)]
  train_log.record(25, fetched)
  record = _records(tmp_path)[0]
  assert record['learning_rate'] == 0.003
  expected_mean = sum(schedule(s) for s in range(25)) / 25
  assert abs(record['learning_rate_mean'] - expected_mean) < 1e-9 and expected_mean < 0.0025
  assert '  lr 0.003  ' in stream.getvalue()
