"""A trained run as a Python object: `hyperprompt_t5x.load(model_dir)`.

    model = hyperprompt_t5x.load('/tmp/hyperprompt_demo')
    model.predict(['fbhde'], task='hyperprompt_demo_max')            # -> ['h']
    model.score(['fbhde'], ['h'], task='hyperprompt_demo_max')        # -> [-0.01]

`load` reads the run's own config (MODEL_DIR/config.gin: model, mixture,
feature lengths, optimizer) and restores its newest checkpoint, or the one
given as MODEL_DIR/checkpoint_<step>. Texts are formatted as the task formats
its inputs (tasks/free_text.py), encoded with the run's vocabulary and given
the task's id. A text longer than the run's input length is refused unless
`truncate=True`. Nothing is written to MODEL_DIR.
"""
from __future__ import annotations

import json
import os
from typing import Any, List, Mapping, Optional, Sequence, Union

import numpy as np

from hyperprompt_t5x.run.metrics_logging import log
from hyperprompt_t5x import partitioning
from hyperprompt_t5x.checkpoints import step_dirs
from hyperprompt_t5x.checkpoints.store import CheckpointStore
from hyperprompt_t5x.evaluation import evaluator
from hyperprompt_t5x.run import model_dir_files, run_setup, train_state

_BATCH = 32  # rows per decoding / scoring call (rounded up to the data-parallel size)


def read_input_file(path: str) -> list:
  """.txt: one input per line; .jsonl: one JSON string or object per line. Never empty."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'--input_file {path} does not exist')
  with open(path, encoding='utf-8') as f:
    lines = [line.rstrip('\n') for line in f]
  lines = [line for line in lines if line.strip()]
  if not lines:
    raise ValueError(f'--input_file {path} is empty: nothing to decode')
  if not path.endswith('.jsonl'):
    return lines
  rows = []
  for number, line in enumerate(lines, 1):
    try:
      row = json.loads(line)
    except ValueError as e:
      raise ValueError(f'{path} line {number}: not JSON ({e})') from e
    if not isinstance(row, (str, dict)):
      raise ValueError(f'{path} line {number}: expected a string or an object of the '
                       f'task\'s fields, got {type(row).__name__}')
    rows.append(row)
  return rows


class Predictor:
  """A restored run: `predict` decodes, `score` gives log-likelihoods; per task."""

  def __init__(self, run, model_dir: str, mixture: str, lengths: Mapping[str, int]):
    self.run = run
    self.model_dir = model_dir
    self.mixture = mixture
    self.lengths = dict(lengths)
    self.step = run.start_step
    self.task_names = list(run.task_names)
    data = run.mesh.shape.get('data', 1)
    self._batch = -(-_BATCH // data) * data
    self._decoder = evaluator.Decoder(run, self._batch, self.lengths['targets'])
    self._eval_step = train_state.make_eval_step(run.model, run.mesh, run.param_shardings)

  @property
  def params(self):
    """The restored parameters (a tree of jax.Arrays)."""
    return self.run.params

  def __repr__(self) -> str:
    return (f'Predictor({self.model_dir}, step {self.step}, method '
            f'{self.run.config.method}, tasks {self.task_names})')

  def _task_id(self, task: Optional[str]) -> int:
    from hyperprompt_t5x import gin_config, tasks  # pylint: disable=g-import-not-at-top
    if task is None and len(self.task_names) == 1:
      task = self.task_names[0]
    if task is None:
      raise ValueError(f'task=... is needed; this run has the tasks {", ".join(self.task_names)}')
    try:
      return tasks.task_id(self.mixture, task)
    except ValueError:
      raise ValueError(
          f'unknown task {task!r}{gin_config.did_you_mean(task, self.task_names)}; this run '
          f'({self.mixture}) has the tasks {", ".join(self.task_names)}') from None

  def _encode(self, texts: Sequence[str], length: int, what: str, truncate: bool) -> np.ndarray:
    """Texts -> int32 [n, length]: tokens, EOS (1), zero padding."""
    rows = np.zeros((len(texts), length), np.int32)
    for i, text in enumerate(texts):
      ids = list(self.run.vocabulary.encode(text)) + [1]
      if len(ids) > length:
        if not truncate:
          raise ValueError(
              f'{what} {i + 1} is {len(ids)} tokens (with EOS), longer than the run\'s '
              f'{what} length {length}: {text[:60]!r}; shorten it or pass truncate=True '
              '(CLI: --truncate)')
        ids = ids[:length - 1] + [1]
      rows[i, :len(ids)] = ids
    return rows

  def _inputs(self, texts, task, truncate) -> tuple[np.ndarray, np.ndarray, List[str]]:
    from hyperprompt_t5x import tasks  # pylint: disable=g-import-not-at-top
    if isinstance(texts, (str, dict)):
      raise TypeError('texts must be a list (of strings, or of dicts of the task\'s fields)')
    task_id = self._task_id(task)
    name = task or self.task_names[0]
    formatted = tasks.format_inputs(name, list(texts))
    tokens = self._encode(formatted, self.lengths['inputs'], 'input', truncate)
    return tokens, np.full((len(formatted),), task_id, np.int32), formatted

  def predict(self, texts: Sequence[Union[str, Mapping[str, Any]]], task: Optional[str] = None,
              truncate: bool = False) -> List[str]:
    """Greedy decoding of `texts` as inputs of `task`: one output string per text."""
    tokens, task_ids, _ = self._inputs(texts, task, truncate)
    out = []
    for start in range(0, len(tokens), self._batch):
      decoded = self._decoder(self.params, tokens[start:start + self._batch],
                              task_ids[start:start + self._batch])
      out += evaluator.decode_text(self.run.vocabulary, decoded)
    return out

  def score(self, texts: Sequence[Union[str, Mapping[str, Any]]], targets: Sequence[str],
            task: Optional[str] = None, truncate: bool = False) -> List[float]:
    """log p(target | text) under `task` (summed over the target's tokens and EOS)."""
    import jax  # pylint: disable=g-import-not-at-top
    if isinstance(targets, str) or len(targets) != len(texts):
      raise ValueError(f'score needs one target per text: {len(texts)} texts, '
                       f'{1 if isinstance(targets, str) else len(targets)} targets')
    tokens, task_ids, _ = self._inputs(texts, task, truncate)
    target_tokens = self._encode(list(targets), self.lengths['targets'], 'target', truncate)
    scores = []
    for start in range(0, len(tokens), self._batch):
      n = len(tokens[start:start + self._batch])
      pad = lambda a: evaluator.pad_rows(a[start:start + self._batch], self._batch)
      targets_ = pad(target_tokens)
      batch = {'encoder_input_tokens': pad(tokens), 'task_ids': pad(task_ids),
               'decoder_target_tokens': targets_,
               # [batch, targets_len]: targets shifted right, 0 first (T5's decoder input)
               'decoder_input_tokens': np.pad(targets_[:, :-1], ((0, 0), (1, 0))),
               'decoder_loss_weights': (targets_ > 0).astype(np.int32)}
      metrics = self._eval_step(self.params,
                                partitioning.shard_batch(batch, self.run.mesh))
      scores += [float(x) for x in np.asarray(jax.device_get(metrics['scores']))[:n]]
    return scores


def load(model_dir: str, checkpoint_step: Optional[int] = None) -> Predictor:
  """The run in `model_dir` (or MODEL_DIR/checkpoint_<step>) restored for prediction."""
  from hyperprompt_t5x import gin_config  # pylint: disable=g-import-not-at-top
  model_dir, step = step_dirs.split(model_dir)
  step = checkpoint_step if checkpoint_step is not None else step
  config_path = os.path.join(model_dir, model_dir_files.CONFIG_FILE)
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f'{config_path} does not exist: {model_dir} is not a MODEL_DIR '
                            'written by `hyperprompt-t5x train`')
  import gin  # pylint: disable=g-import-not-at-top
  gin_config.parse([config_path], macros=[('MODEL_DIR', repr(model_dir))])
  values = {name: gin.query_parameter(f'%{name}') for name in
            ('MIXTURE_OR_TASK_NAME', 'TASK_FEATURE_LENGTHS')}
  lengths = run_setup.validate_feature_lengths(values['TASK_FEATURE_LENGTHS'])
  config = gin_config.model_config()
  store = CheckpointStore(model_dir, create=False)
  run = run_setup.restore_for_inference(
      model_dir=model_dir, config=config, mixture_or_task_name=values['MIXTURE_OR_TASK_NAME'],
      task_feature_lengths=lengths, store=store,
      checkpoint_step=None if step is None else int(step))
  log(f'loaded {model_dir} at step {run.start_step}')
  return Predictor(run, model_dir, values['MIXTURE_OR_TASK_NAME'], lengths)
