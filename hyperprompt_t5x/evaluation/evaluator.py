"""Evaluation as in the paper: per-task validation metrics from greedy decoding.

* `Evaluator` decodes every validation example of every task of the mixture
  (greedy, with the key/value cache), scores the text with the task's metric
  (`hyperprompt_t5x.tasks.compute_metrics`), writes the scores to metrics.jsonl
  and keeps MODEL_DIR/best.json: per task the best step and score so far (the
  paper's best-checkpoint-per-task protocol) and the average of those bests.
* `evaluate` (CLI `eval`) scores one checkpoint; `infer` (CLI `infer`) writes
  predictions as JSONL (inputs, target, prediction, task).

A task's score is the mean of its metrics (T5's convention: MRPC's F1 and
accuracy, STS-B's Pearson and Spearman, ...).
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping, Optional

import jax
from jax.experimental import multihost_utils
import numpy as np

from hyperprompt_t5x import partitioning
from hyperprompt_t5x.checkpoints import step_dirs, t5x_run_store
from hyperprompt_t5x.checkpoints.store import CheckpointStore
from hyperprompt_t5x.model import network
from hyperprompt_t5x.run import run_setup, train_state
from hyperprompt_t5x.run.metrics_logging import log

BEST_FILE = 'best.json'


def task_score(metrics: Mapping[str, float]) -> float:
  values = [float(v) for v in metrics.values()]
  return float(np.mean(values)) if values else float('nan')


def pad_rows(array: np.ndarray, rows: int) -> np.ndarray:
  if array.shape[0] == rows:
    return array
  pad = [(0, rows - array.shape[0])] + [(0, 0)] * (array.ndim - 1)
  return np.pad(array, pad)


class Decoder:
  """Greedy cached decoding of fixed-size batches on the run's mesh (jitted once)."""

  def __init__(self, run, batch_size: int, max_decode_length: int):
    if batch_size % jax.process_count():
      raise ValueError(f'EVAL_BATCH_SIZE {batch_size} is not divisible by the '
                       f'{jax.process_count()} processes')
    self.batch_size = batch_size
    self.mesh = run.mesh
    self.num_tasks = run.config.num_tasks
    self._fn = train_state.make_predict_fn(run.model, run.mesh, run.param_shardings,
                                           max_decode_length=max_decode_length)

  def __call__(self, params, encoder_input_tokens: np.ndarray,
               task_ids: np.ndarray) -> np.ndarray:
    """[n, inputs_len] tokens (n <= batch_size) -> [n, max_decode_length] tokens.

    A task id outside [0, num_tasks) is refused here: inside the compiled
    program it would gather NaN conditioning (network.check_task_ids).
    """
    network.check_task_ids(task_ids, self.num_tasks)
    n = encoder_input_tokens.shape[0]
    batch = {'encoder_input_tokens': pad_rows(np.asarray(encoder_input_tokens, np.int32),
                                               self.batch_size),
             'task_ids': pad_rows(np.asarray(task_ids, np.int32), self.batch_size)}
    processes = jax.process_count()
    if processes > 1:  # each process feeds its slice of the (identical) eval batch
      rows = self.batch_size // processes
      start = jax.process_index() * rows
      batch = {k: v[start:start + rows] for k, v in batch.items()}
    out = self._fn(params, partitioning.shard_batch(batch, self.mesh))
    if processes > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      out = multihost_utils.process_allgather(out, tiled=True)
    return np.asarray(jax.device_get(out))[:n]


def decode_text(vocabulary, tokens: np.ndarray) -> list:
  """Token rows -> strings, cut at the first EOS (1)."""
  texts = []
  for row in np.asarray(tokens):
    row = row.tolist()
    if 1 in row:
      row = row[:row.index(1)]
    texts.append(vocabulary.decode([t for t in row if t > 0]))
  return texts


class TaskEvalSet:
  """One task's validation batches (capped at `max_examples`) with input/target texts."""

  def __init__(self, eval_dataset, max_examples: Optional[int]):
    self.name = eval_dataset.name
    self.task_id = eval_dataset.task_id
    n = eval_dataset.num_examples if max_examples is None else min(
        max_examples, eval_dataset.num_examples)
    self.targets = list(eval_dataset.targets[:n])
    self.inputs = list(eval_dataset.inputs[:n])
    self.batches, seen = [], 0
    for batch in eval_dataset.dataset.as_numpy_iterator():
      if seen >= n:
        break
      rows = min(len(batch['task_ids']), n - seen)
      self.batches.append({k: np.asarray(v)[:rows] for k, v in batch.items()})
      seen += rows


def eval_sets(mixture_or_task_name: str, split: str, lengths: Mapping[str, int],
              batch_size: int, max_examples: Optional[int]) -> list:
  """The mixture's per-task eval sets (`tasks.get_eval_datasets`), materialised once."""
  from hyperprompt_t5x import tasks  # pylint: disable=g-import-not-at-top
  return [TaskEvalSet(d, max_examples) for d in tasks.get_eval_datasets(
      mixture_or_task_name, split=split, task_feature_lengths=dict(lengths),
      batch_size=batch_size)]


def predict_task(decoder: Decoder, vocabulary, params, eval_set: TaskEvalSet) -> list:
  """Predicted texts of one task's eval set, in order."""
  predictions = []
  for batch in eval_set.batches:
    tokens = decoder(params, batch['encoder_input_tokens'], batch['task_ids'])
    predictions += decode_text(vocabulary, tokens)
  return predictions


_SHORT_METRIC = {'accuracy': 'acc', 'matthews_corrcoef': 'mcc', 'pearson_corrcoef': 'pearson',
                 'spearman_corrcoef': 'spearman', 'mean_3class_f1': 'f1', 'macro_f1': 'f1',
                 'exact_match': 'em'}
TABLE_WIDTH = 80


def _fit(text: str, width: int) -> str:
  return text if len(text) <= width else text[:width - 1] + '~'


def short_task_names(names) -> tuple[str, dict]:
  """(prefix, name -> name without it): the `_`-ended prefix every task name shares."""
  names = list(names)
  prefix = os.path.commonprefix(names) if len(names) > 1 else ''
  prefix = prefix[:prefix.rfind('_') + 1]
  return prefix, {n: n[len(prefix):] for n in names}


def _metrics_text(metrics: Mapping[str, float]) -> str:
  """A task's metric names; with their values when there are several (the score is
  their mean), else the name alone (the score column is its value)."""
  if len(metrics) == 1:
    return _SHORT_METRIC.get(next(iter(metrics)), next(iter(metrics)))
  return ', '.join(f'{_SHORT_METRIC.get(k, k)} {v:.2f}' for k, v in metrics.items())


def format_table(results: Mapping[str, Mapping[str, float]],
                 best: Optional[Mapping[str, Any]] = None, step: Optional[int] = None,
                 show_scores: bool = True) -> str:
  """Per-task table, <= 80 columns, every number under a header that names it.

  Columns: task (without the prefix all names share, named on the first line),
  metric(s), `score@<step>` (the mean of the task's metrics in `results`), and
  with `best` the best score so far and the step it was reached at.
  `show_scores=False` leaves the score column out (`results` are the best's).
  """
  prefix, shown = short_task_names(results)
  texts = {n: _metrics_text(m) for n, m in results.items()}
  columns = []  # (header, {task: text}, average text)
  if show_scores:
    avg = float(np.mean([task_score(m) for m in results.values()])) if results else float('nan')
    columns.append((f'score@{step}' if step is not None else 'score',
                    {n: f'{task_score(m):.2f}' for n, m in results.items()}, f'{avg:.2f}'))
  if best:
    entries = best.get('tasks', {})
    columns.append(('best score', {n: f'{entries[n]["score"]:.2f}' for n in results
                                   if n in entries},
                    f'{best["average"]:.2f}' if 'average' in best else ''))
    columns.append(('at step', {n: str(entries[n]['step']) for n in results if n in entries},
                    ''))
  widths = [max([len(h), len(avg)] + [len(v) for v in values.values()])
            for h, values, avg in columns]
  tail = sum(w + 2 for w in widths)
  name_w = min(max([len('average')] + [len(v) for v in shown.values()]), 28)
  metrics_w = max(len('metric'), min(max([0] + [len(t) for t in texts.values()]),
                                     TABLE_WIDTH - name_w - 1 - tail))

  def row(name: str, metric: str, cells) -> str:
    return (f'{_fit(name, name_w):<{name_w}} {_fit(metric, metrics_w):<{metrics_w}}'
            + ''.join(f'  {c:>{w}}' for c, w in zip(cells, widths))).rstrip()

  lines = [f'tasks {prefix}*'] if prefix else []
  lines.append(row('task', 'metric', [h for h, _, _ in columns]))
  lines += [row(shown[n], texts[n], [values.get(n, '') for _, values, _ in columns])
            for n in results]
  lines.append(row('average', '', [avg for _, _, avg in columns]))
  return '\n'.join(lines)


def read_best(model_dir: str) -> Optional[dict]:
  """MODEL_DIR/best.json (per task: best step, score, metrics), or None."""
  path = os.path.join(model_dir, BEST_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def format_best_table(best: Mapping[str, Any]) -> str:
  """best.json as the per-task table: the best metrics, their step and the average."""
  results = {name: entry.get('metrics', {}) for name, entry in best.get('tasks', {}).items()}
  return format_table(results, best, show_scores=False)


class Evaluator:
  """Validation of every task of a mixture; best.json bookkeeping."""

  def __init__(self, run, mixture_or_task_name: str, lengths: Mapping[str, int], *,
               split: str = 'validation', batch_size: int = 32,
               max_examples: Optional[int] = None, model_dir: Optional[str] = None,
               sets: Optional[list] = None):
    self.run_ = run
    self.vocabulary = run.vocabulary
    self.model_dir = model_dir or str(run.store.directory)
    self.split = split
    self.sets = sets if sets is not None else eval_sets(
        mixture_or_task_name, split, lengths, batch_size, max_examples)
    self.decoder = Decoder(run, batch_size, lengths['targets'])
    self.last = None
    self.last_step = None
    self.best = self._read_best()

  def _read_best(self) -> dict:
    return read_best(self.model_dir) or {'tasks': {}}

  def predictions(self, params) -> dict:
    """task -> (inputs, targets, predictions)."""
    return {s.name: (s.inputs, s.targets,
                     predict_task(self.decoder, self.vocabulary, params, s))
            for s in self.sets}

  def scores(self, params) -> dict:
    from hyperprompt_t5x import tasks  # pylint: disable=g-import-not-at-top
    results = {}
    for name, (_, targets, predictions) in self.predictions(params).items():
      results[name] = {k: float(v) for k, v in
                       tasks.compute_metrics(name, targets, predictions).items()}
    return results

  def run(self, params, step: int, logger=None) -> dict:
    """Scores `params` at `step`; logs them and updates best.json."""
    t0 = time.perf_counter()
    results = self.scores(params)
    self.last, self.last_step = results, step
    flat = {f'{self.split}/{task}/{metric}': value
            for task, metrics in results.items() for metric, value in metrics.items()}
    flat[f'{self.split}/average_score'] = float(np.mean(
        [task_score(m) for m in results.values()]))
    if logger is not None:
      logger.write(step, flat)
    self.update_best(step, results)
    if jax.process_index() == 0:
      _, short = short_task_names(results)
      print(f'eval at step {step} ({time.perf_counter() - t0:.1f} s): average '
            f'{flat[f"{self.split}/average_score"]:.2f}; ' + ', '.join(
                f'{short[name]} {task_score(m):.2f}' for name, m in results.items()),
            flush=True)
    return results

  def update_best(self, step: int, results: Mapping[str, Mapping[str, float]]) -> None:
    tasks_best = self.best.setdefault('tasks', {})
    for name, metrics in results.items():
      score = task_score(metrics)
      if name not in tasks_best or score > tasks_best[name]['score']:
        tasks_best[name] = {'step': int(step), 'score': score, 'metrics': dict(metrics)}
    self.best['average'] = float(np.mean([v['score'] for v in tasks_best.values()]))
    self.best['split'] = self.split
    if jax.process_index() == 0:
      path = os.path.join(self.model_dir, BEST_FILE)
      with open(path + '.tmp', 'w') as f:
        json.dump(self.best, f, indent=2, sort_keys=True)
      os.replace(path + '.tmp', path)


def eval_missing(logger, evaluator, start: int, eval_period, train_steps: int) -> bool:
  """Whether the eval due at `start` is not in metrics.jsonl (a kill after its save)."""
  due = start > 0 and ((eval_period and start % eval_period == 0) or start == train_steps)
  missing = bool(due) and not logger.logged(start, (evaluator.split,))
  if jax.process_count() > 1:  # only the chief reads metrics.jsonl; all must agree
    missing = bool(multihost_utils.broadcast_one_to_all(np.int32(missing)))
  return missing


# ----------------------------------------------------------------------------
# CLI entry points (gin configurables `evaluate` and `infer`).
# ----------------------------------------------------------------------------


def _checkpoint_step(checkpoint_path: Optional[str]) -> tuple:
  """CHECKPOINT_PATH -> (model_dir or None, step or None)."""
  if checkpoint_path is None:
    return None, None
  model_dir, step = step_dirs.split(checkpoint_path)
  if step is not None:
    return model_dir, step
  raise ValueError(f'CHECKPOINT_PATH {checkpoint_path!r} is not a MODEL_DIR/checkpoint_<step> '
                   'directory (leave it None for the latest checkpoint in MODEL_DIR)')


def restored_evaluator(model_dir, model_config, mixture_or_task_name, task_feature_lengths,
                       checkpoint_path, num_partitions, *, split, batch_size, max_examples):
  """A MODEL_DIR checkpoint restored for inference and an Evaluator over its tasks."""
  if not isinstance(model_dir, str):
    raise ValueError(f'model_dir must be a path, got {model_dir!r} (gin macro MODEL_DIR)')
  ckpt_dir, step = _checkpoint_step(checkpoint_path)
  if ckpt_dir is not None:
    model_dir = ckpt_dir
  steps = step_dirs.steps_in(model_dir)
  if not steps:
    raise FileNotFoundError(f'no checkpoint in MODEL_DIR {model_dir} (nothing to evaluate)')
  if step is not None and step not in steps:
    raise FileNotFoundError(f'no {step_dirs.name(step)} in {model_dir}; it has '
                            f'{[step_dirs.name(s) for s in steps]}')
  lengths = run_setup.validate_feature_lengths(task_feature_lengths)
  if t5x_run_store.is_t5x_checkpoint(
      step_dirs.path(model_dir, steps[-1] if step is None else step)):
    store = t5x_run_store.T5XCheckpointStore(model_dir)  # written by T5X
  else:
    store = CheckpointStore(model_dir, create=False)
  run = run_setup.restore_for_inference(
      model_dir=model_dir, config=model_config, mixture_or_task_name=mixture_or_task_name,
      task_feature_lengths=lengths, store=store, num_partitions=num_partitions,
      checkpoint_step=step)
  evaluator = Evaluator(run, mixture_or_task_name, lengths, split=split,
                        batch_size=batch_size, max_examples=max_examples,
                        model_dir=model_dir)
  return run, evaluator, model_dir


def evaluate(*, model_dir: str, model_config, mixture_or_task_name: str,
             task_feature_lengths: Mapping[str, int], checkpoint_path: Optional[str] = None,
             split: str = 'validation', batch_size: int = 32,
             max_examples: Optional[int] = None, num_partitions: int = 1,
             optimizer: str = 'adafactor', freeze: str = 'all') -> dict:
  """Scores one checkpoint (default: the latest in MODEL_DIR) on every task.

  Results go to MODEL_DIR/eval_<split>_<step>.json and the table to stdout;
  best.json is not touched (it tracks the training run's periodic evals).
  `optimizer` and `freeze` are not used (no optimizer state is read); they stay so
  that config.gin files of earlier runs, which bind them, still parse.
  """
  del optimizer, freeze
  run, evaluator, model_dir = restored_evaluator(
      model_dir, model_config, mixture_or_task_name, task_feature_lengths,
      checkpoint_path, num_partitions, split=split,
      batch_size=batch_size, max_examples=max_examples)
  results = evaluator.scores(run.params)
  out = {'step': run.start_step, 'split': split, 'tasks': results,
         'average': float(np.mean([task_score(m) for m in results.values()]))}
  if jax.process_index() == 0:
    path = os.path.join(model_dir, f'eval_{split}_{run.start_step}.json')
    with open(path, 'w') as f:
      json.dump(out, f, indent=2, sort_keys=True)
    log(f'{split} split, step {run.start_step}:')
    print(format_table(results, step=run.start_step), flush=True)
    log(f'written {path}')
  return out


def infer(*, model_dir: str, model_config, mixture_or_task_name: str,
          task_feature_lengths: Mapping[str, int], checkpoint_path: Optional[str] = None,
          split: str = 'validation', batch_size: int = 32, max_examples: Optional[int] = None,
          output_path: Optional[str] = None, num_partitions: int = 1,
          optimizer: str = 'adafactor', freeze: str = 'all') -> str:
  """Writes predictions as JSONL: one {inputs, target, prediction, task} per example.

  `optimizer` and `freeze`: not used, as for `evaluate`.
  """
  del optimizer, freeze
  run, evaluator, model_dir = restored_evaluator(
      model_dir, model_config, mixture_or_task_name, task_feature_lengths,
      checkpoint_path, num_partitions, split=split,
      batch_size=batch_size, max_examples=max_examples)
  path = output_path or os.path.join(model_dir, f'predictions_{split}_{run.start_step}.jsonl')
  if os.path.exists(path):
    raise FileExistsError(f'{path} exists; choose another INFER_OUTPUT_PATH')
  count = 0
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + '.tmp', 'w') as f:
      for task, (inputs, targets, predictions) in evaluator.predictions(
          run.params).items():
        for x, t, p in zip(inputs, targets, predictions):
          f.write(json.dumps({'inputs': x, 'target': t, 'prediction': p, 'task': task},
                             default=str) + '\n')
          count += 1
    os.replace(path + '.tmp', path)
    log(f'wrote {count} predictions to {path}')
  return path
