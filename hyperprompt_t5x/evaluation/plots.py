"""Pictures of a run from its own files: MODEL_DIR/plots/*.png.

* training.png: the training loss and the learning rate against step;
* validation_<task>.png: each of the task's validation metrics and its score
  (their mean) against step, the best step (best.json's) marked.

Reads MODEL_DIR/metrics.jsonl (a line still being written is skipped) and
best.json, so it works on a finished run and on one still running (CLI `plot`).
matplotlib is imported here only, with the Agg backend (no display needed).
"""
from __future__ import annotations

import json
import os
from hyperprompt_t5x.evaluation import evaluator

PLOTS_DIR = 'plots'


def read_metrics(model_dir: str) -> list:
  """The complete JSON lines of MODEL_DIR/metrics.jsonl."""
  path = os.path.join(model_dir, 'metrics.jsonl')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} does not exist: no metrics to plot in MODEL_DIR {model_dir}')
  records = []
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:
        continue  # a partial last line of a running run
      if isinstance(record, dict) and 'step' in record:
        records.append(record)
  return records


def _validation_series(records: list) -> dict:
  """task -> metric -> [(step, value)] from the eval records (keys split/task/metric)."""
  series: dict = {}
  for record in records:
    for key, value in record.items():
      parts = key.split('/')
      if len(parts) == 3 and isinstance(value, (int, float)):
        _, task, metric = parts
        series.setdefault(task, {}).setdefault(metric, []).append((record['step'], value))
  return series


def _save(figure, path: str) -> None:
  """Writes the PNG beside, then renames: a reader never sees half a file."""
  figure.savefig(path + '.tmp.png', dpi=80)
  os.replace(path + '.tmp.png', path)


def draw(model_dir: str) -> list:
  """Redraws every plot of MODEL_DIR; returns the PNG paths written."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  records = read_metrics(model_dir)
  out_dir = os.path.join(model_dir, PLOTS_DIR)
  os.makedirs(out_dir, exist_ok=True)
  written = []
  train = [r for r in records if 'loss' in r]
  if train:
    figure, (loss_ax, lr_ax) = plt.subplots(2, 1, figsize=(6, 4.5), sharex=True)
    loss_ax.plot([r['step'] for r in train], [r['loss'] for r in train], color='C0')
    loss_ax.set_ylabel('training loss')
    loss_ax.set_title(os.path.basename(os.path.normpath(model_dir)))
    lr = [r for r in train if 'learning_rate' in r]
    lr_ax.plot([r['step'] for r in lr], [r['learning_rate'] for r in lr], color='C1')
    lr_ax.set_ylabel('learning rate')
    lr_ax.set_xlabel('step')
    figure.tight_layout()
    path = os.path.join(out_dir, 'training.png')
    _save(figure, path)
    plt.close(figure)
    written.append(path)
  best = evaluator.read_best(model_dir)
  for task, metrics in sorted(_validation_series(records).items()):
    figure, ax = plt.subplots(figsize=(6, 3.5))
    for metric, points in sorted(metrics.items()):
      ax.plot([s for s, _ in points], [v for _, v in points], marker='o', label=metric)
    best_task = (best or {}).get('tasks', {}).get(task)
    if best_task:
      ax.axvline(best_task['step'], color='grey', linestyle='--',
                 label=f'best: step {best_task["step"]} (score {best_task["score"]:.2f})')
    ax.set_xlabel('step')
    ax.set_ylabel('validation metric')
    ax.set_title(task)
    ax.legend(fontsize='small')
    figure.tight_layout()
    path = os.path.join(out_dir, f'validation_{task}.png')
    _save(figure, path)
    plt.close(figure)
    written.append(path)
  return written
