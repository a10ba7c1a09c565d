"""A trained run as a Python object: `hyperprompt_t5x.load(model_dir)`.

    model = hyperprompt_t5x.load('/tmp/hyperprompt_demo')
    model.predict(['fbhde'], task='hyperprompt_demo_max')            # -> ['h']
    model.score(['fbhde'], ['h'], task='hyperprompt_demo_max')        # -> [-0.01]

`load` reads the run's own config (MODEL_DIR/config.gin: model, mixture,
feature lengths, optimizer) and restores its newest checkpoint, or the one
given as MODEL_DIR/checkpoint_<step>. Texts are formatted as the task formats
its inputs (tasks/free_text.py), encoded with the run's vocabulary and given
the task's id. A text longer than the run's input length is refused unless
`truncate=True`. An empty or blank text is not decoded: its answer is None (the
CLI writes `{"input": "", "error": "empty input"}`), so there is always one
answer per text, in order. Nothing is written to MODEL_DIR, and nothing is
printed unless `load(..., verbose=True)` (status lines to stderr).
"""
from __future__ import annotations

import json
import os
from typing import Any, List, Mapping, Optional, Sequence, Union

import jax
import numpy as np

from hyperprompt_t5x import compilation_cache, partitioning
from hyperprompt_t5x.checkpoints import step_dirs
from hyperprompt_t5x.checkpoints.store import CheckpointStore
from hyperprompt_t5x.evaluation import evaluator
from hyperprompt_t5x.run import metrics_logging, model_dir_files, run_setup, train_state
from hyperprompt_t5x.run.metrics_logging import log

_BATCH = 32  # rows per decoding / scoring call (rounded up to the data-parallel size)
EMPTY_INPUT = 'empty input'  # the answer to an empty or blank input (CLI and predict)


def read_input_file(path: str) -> list:
  """.txt: one input per line; .jsonl: one JSON string or object per line.

  Every line is an input, blank ones included (they get EMPTY_INPUT as their
  answer), so answer N is for line N. A missing, unreadable or empty file, bytes
  that are not UTF-8 and a bad .jsonl line are errors naming the file (and line).
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'--input_file {path} does not exist'
                            + (' (it is a directory)' if os.path.isdir(path) else ''))
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except OSError as e:
    raise ValueError(f'--input_file {path} cannot be read: {e.strerror or e}') from e
  lines = data.split(b'\n')
  if lines[-1] == b'':
    lines.pop()  # the newline that ends the last line
  if not lines:
    raise ValueError(f'--input_file {path} is empty: nothing to decode')
  rows = []
  for number, raw in enumerate(lines, 1):
    try:
      line = raw.decode('utf-8').rstrip('\r')
    except UnicodeDecodeError as e:
      raise ValueError(f'--input_file {path} line {number}: bytes {raw[e.start:e.end]!r} '
                       f'at column {e.start + 1} are not UTF-8 ({e.reason}); save the '
                       'file as UTF-8') from e
    rows.append(_jsonl_row(path, number, line) if path.endswith('.jsonl') else line)
  return rows


def _jsonl_row(path: str, number: int, line: str):
  """One .jsonl line: a string or an object; a blank line is an empty input."""
  if not line.strip():
    return ''
  try:
    row = json.loads(line)
  except ValueError as e:
    raise ValueError(f'--input_file {path} line {number}: not JSON ({e})') from e
  if not isinstance(row, (str, dict)):
    raise ValueError(f'--input_file {path} line {number}: expected a string or an object '
                     f'of the task\'s fields, got {type(row).__name__}')
  return row


def is_blank(text) -> bool:
  """An empty or whitespace-only text, or an object whose fields all are."""
  if isinstance(text, str):
    return not text.strip()
  return isinstance(text, Mapping) and all(isinstance(v, str) and not v.strip()
                                           for v in text.values())


def check_texts(texts, name: str = 'texts') -> list:
  """`texts` as a list, each a string or a dict (TypeError naming the bad position)."""
  if isinstance(texts, (str, bytes, Mapping)) or not isinstance(texts, Sequence):
    raise TypeError(f'{name} must be a list (of strings, or of dicts of the task\'s '
                    f'fields), got {type(texts).__name__}')
  for i, text in enumerate(texts):
    if not isinstance(text, (str, Mapping)):
      raise TypeError(f'{name}[{i}] is {type(text).__name__} {text!r}; each must be a '
                      'string or a dict of the task\'s fields')
  return list(texts)


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
    if not isinstance(task, str):
      raise TypeError(f'task must be a task name (str), got {type(task).__name__} {task!r}; '
                      f'this run has the tasks {", ".join(self.task_names)}')
    try:
      return tasks.task_id(self.mixture, task)
    except ValueError:
      raise ValueError(
          f'unknown task {task!r}{gin_config.did_you_mean(task, self.task_names)}; this run '
          f'({self.mixture}) has the tasks {", ".join(self.task_names)}') from None

  def _encode(self, texts: Sequence[str], positions: Sequence[int], length: int, what: str,
              truncate: bool) -> np.ndarray:
    """Texts -> int32 [n, length]: tokens, EOS (1), zero padding."""
    rows = np.zeros((len(texts), length), np.int32)
    for i, (text, position) in enumerate(zip(texts, positions)):
      ids = list(self.run.vocabulary.encode(text)) + [1]
      if len(ids) > length:
        if not truncate:
          raise ValueError(
              f'{"texts" if what == "input" else "targets"}[{position}] is {len(ids)} '
              f'tokens (with EOS), longer than the run\'s '
              f'{what} length {length}: {text[:60]!r}; shorten it or pass truncate=True '
              '(CLI: --truncate)')
        ids = ids[:length - 1] + [1]
      rows[i, :len(ids)] = ids
    return rows

  def _inputs(self, texts, task, truncate) -> tuple[np.ndarray, np.ndarray, List[int]]:
    """(tokens, task ids) of the non-blank texts, and their positions in `texts`."""
    from hyperprompt_t5x import tasks  # pylint: disable=g-import-not-at-top
    texts = check_texts(texts)
    task_id = self._task_id(task)
    name = task or self.task_names[0]
    kept = [i for i, text in enumerate(texts) if not is_blank(text)]
    formatted = tasks.format_inputs(name, [texts[i] for i in kept], positions=kept)
    tokens = self._encode(formatted, kept, self.lengths['inputs'], 'input', truncate)
    return tokens, np.full((len(formatted),), task_id, np.int32), kept

  def predict(self, texts: Sequence[Union[str, Mapping[str, Any]]], task: Optional[str] = None,
              truncate: bool = False) -> List[Optional[str]]:
    """Greedy decoding of `texts` as inputs of `task`: one answer per text, in order
    (None for an empty or blank text)."""
    tokens, task_ids, kept = self._inputs(texts, task, truncate)
    decoded = []
    for start in range(0, len(tokens), self._batch):
      rows = self._decoder(self.params, tokens[start:start + self._batch],
                           task_ids[start:start + self._batch])
      decoded += evaluator.decode_text(self.run.vocabulary, rows)
    out: List[Optional[str]] = [None] * len(texts)
    for position, text in zip(kept, decoded):
      out[position] = text
    return out

  def score(self, texts: Sequence[Union[str, Mapping[str, Any]]], targets: Sequence[str],
            task: Optional[str] = None, truncate: bool = False) -> List[Optional[float]]:
    """log p(target | text) under `task` (summed over the target's tokens and EOS); one
    per text, in order (None for an empty or blank text)."""
    texts = check_texts(texts)
    if isinstance(targets, (str, bytes)) or not isinstance(targets, Sequence):
      raise TypeError(f'targets must be a list of strings, got {type(targets).__name__}')
    if len(targets) != len(texts):
      raise ValueError(f'score needs one target per text: {len(texts)} texts, '
                       f'{len(targets)} targets')
    bad = next((i for i, t in enumerate(targets) if not isinstance(t, str)), None)
    if bad is not None:
      raise TypeError(f'targets[{bad}] is {type(targets[bad]).__name__} {targets[bad]!r}; '
                      'each target must be a string')
    tokens, task_ids, kept = self._inputs(texts, task, truncate)
    target_tokens = self._encode([targets[i] for i in kept], kept, self.lengths['targets'],
                                 'target', truncate)
    scores = []
    for start in range(0, len(tokens), self._batch):
      n = len(tokens[start:start + self._batch])
      batch = self._score_batch(tokens, task_ids, target_tokens, start)
      metrics = self._eval_step(self.params,
                                partitioning.shard_batch(batch, self.run.mesh))
      scores += [float(x) for x in np.asarray(jax.device_get(metrics['scores']))[:n]]
    out: List[Optional[float]] = [None] * len(texts)
    for position, value in zip(kept, scores):
      out[position] = value
    return out

  def _score_batch(self, tokens, task_ids, target_tokens, start: int) -> dict:
    """Rows start..start+batch of the inputs and targets as one padded score batch."""
    pad = lambda a: evaluator.pad_rows(a[start:start + self._batch], self._batch)
    targets = pad(target_tokens)
    return {'encoder_input_tokens': pad(tokens), 'task_ids': pad(task_ids),
            'decoder_target_tokens': targets,
            # [batch, targets_len]: targets shifted right, 0 first (T5's decoder input)
            'decoder_input_tokens': np.pad(targets[:, :-1], ((0, 0), (1, 0))),
            'decoder_loss_weights': (targets > 0).astype(np.int32)}


def load(model_dir: str, checkpoint_step: Optional[int] = None, *,
         gin_files: Sequence[str] = (), gin_search_paths: Sequence[str] = (),
         macros: Sequence[tuple] = (), verbose: bool = False) -> Predictor:
  """The run in `model_dir` (or MODEL_DIR/checkpoint_<step>) restored for prediction.

  Its own config (MODEL_DIR/config.gin) unless `gin_files` are given; `macros`:
  ('NAME', 'value') overrides as the CLI's --gin.NAME=value. A config of another
  model than the checkpoints' is refused in one line. `verbose`: status lines
  (task ids, the restored step) to stderr; otherwise nothing is printed. JAX's
  persistent compilation cache is on (compilation_cache.py).
  """
  with metrics_logging.talking_to('stderr' if verbose else None):
    compilation_cache.enable()
    return _load(model_dir, checkpoint_step, gin_files, gin_search_paths, macros)


def _load(model_dir, checkpoint_step, gin_files, gin_search_paths, macros) -> Predictor:
  from hyperprompt_t5x import gin_config  # pylint: disable=g-import-not-at-top
  if not isinstance(model_dir, (str, os.PathLike)):
    raise TypeError(f'model_dir must be a path, got {type(model_dir).__name__} {model_dir!r}')
  if checkpoint_step is not None and (not isinstance(checkpoint_step, int)
                                      or isinstance(checkpoint_step, bool)
                                      or checkpoint_step < 0):
    raise TypeError(f'checkpoint_step must be an integer >= 0 or None, got {checkpoint_step!r}')
  model_dir, step = step_dirs.split(model_dir)
  step = checkpoint_step if checkpoint_step is not None else step
  config_path = os.path.join(model_dir, model_dir_files.CONFIG_FILE)
  if not gin_files and not os.path.isfile(config_path):
    raise FileNotFoundError(f'{config_path} does not exist: {model_dir} is not a MODEL_DIR '
                            'written by `hyperprompt-t5x train`')
  import gin  # pylint: disable=g-import-not-at-top
  gin_config.parse(list(gin_files) or [config_path], gin_search_paths=gin_search_paths,
                   macros=[('MODEL_DIR', repr(model_dir))] + list(macros))
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
