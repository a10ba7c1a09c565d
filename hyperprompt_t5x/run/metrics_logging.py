"""Training observability: the progress line, MODEL_DIR/metrics.jsonl, TensorBoard.

Only the chief process (jax.process_index() == 0) writes files. metrics.jsonl
holds each step once per kind of record (train, or an eval split): a run that
resumes from a checkpoint older than its last log line (after a kill) repeats
steps whose records are already there; those are not written again. A line
cut short by a kill is dropped when the file is next opened. TensorBoard goes
through `clu.metric_writers`, imported lazily; where clu/TensorFlow is missing the
JSONL file and the progress line still work (with one warning).

Status lines (`log`) go to stdout under `train`, whose console is its output;
commands whose stdout carries results (eval, infer, analyze, ...) send them to
stderr, and `hyperprompt_t5x.load` silences them unless asked (`talking_to`).
"""
from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import sys
import time
from typing import Any, Iterator, Mapping, Optional

import numpy as np

TALK_STREAMS = ('stdout', 'stderr', None)
_talk = {'stream': 'stdout'}  # where `log` writes: a sys attribute name, or None: nowhere


def is_chief() -> bool:
  """Process 0 of a multi-host run: the one that prints and writes files."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index() == 0


def log(message: str) -> None:
  """One status line from the chief process (to stdout, stderr or nowhere: `talking_to`)."""
  stream = _talk['stream']
  if stream is not None and is_chief():
    print(message, file=getattr(sys, stream), flush=True)


@contextlib.contextmanager
def talking_to(stream: Optional[str]) -> Iterator[None]:
  """Within the block `log` writes to 'stdout', 'stderr' or nowhere (None)."""
  if stream not in TALK_STREAMS:
    raise ValueError(f'stream must be one of {TALK_STREAMS}, got {stream!r}')
  previous, _talk['stream'] = _talk['stream'], stream
  try:
    yield
  finally:
    _talk['stream'] = previous


def _scalar(value: Any) -> Any:
  """numpy/jax scalars -> plain Python numbers for JSON."""
  try:
    return value.item()
  except AttributeError:
    return value


def format_eta(seconds: float) -> str:
  if not math.isfinite(seconds) or seconds < 0:
    return '?'
  return str(datetime.timedelta(seconds=int(round(seconds))))


def record_kind(keys) -> tuple:
  """What a record is about: () for train metrics, ('validation',) for an eval split's."""
  return tuple(sorted({k.split('/', 1)[0] for k in keys if '/' in k and k != 'step'}))


def read_logged(path: str) -> set:
  """(step, kind) of every complete line of metrics.jsonl; truncates a partial last line."""
  if not os.path.exists(path):
    return set()
  with open(path, 'rb') as f:
    data = f.read()
  end = data.rfind(b'\n') + 1
  if end < len(data):  # the writer was killed mid-line
    with open(path, 'r+b') as f:
      f.truncate(end)
  logged = set()
  for line in data[:end].splitlines():
    try:
      record = json.loads(line)
    except ValueError:
      continue
    if isinstance(record, dict) and 'step' in record:
      logged.add((record['step'], record_kind(record)))
  return logged


class MetricsLogger:
  """Writes one JSON object per logged step and the same scalars to TensorBoard."""

  def __init__(self, model_dir: str, *, tensorboard: bool = True, is_chief: bool = True,
               stream=None):
    self.model_dir = model_dir
    self.is_chief = is_chief
    self.stream = stream or sys.stdout
    self._writer = None
    self._logged = read_logged(os.path.join(model_dir, 'metrics.jsonl')) if is_chief else set()
    if is_chief and tensorboard:
      try:
        from clu import metric_writers  # pylint: disable=g-import-not-at-top
        self._writer = metric_writers.SummaryWriter(os.path.join(model_dir, 'train'))
      except ImportError as e:
        print(f'warning: TensorBoard logging off ({e}); metrics.jsonl still written',
              file=sys.stderr)

  def write(self, step: int, metrics: Mapping[str, Any], *, prefix: str = '') -> None:
    """Appends `{'step': step, **metrics}` to metrics.jsonl and writes TB scalars.

    A step already logged with the same kind of record (see module doc) is skipped.
    """
    if not self.is_chief:
      return
    record = {'step': int(step)}
    record.update({f'{prefix}{k}': _scalar(v) for k, v in metrics.items()})
    key = (record['step'], record_kind(record))
    if key in self._logged:
      return
    self._logged.add(key)
    with open(os.path.join(self.model_dir, 'metrics.jsonl'), 'a') as f:
      f.write(json.dumps(record) + '\n')
    if self._writer is not None:
      scalars = {k: v for k, v in record.items()
                 if k != 'step' and isinstance(v, (int, float)) and not isinstance(v, bool)}
      self._writer.write_scalars(int(step), scalars)
      self._writer.flush()

  def logged(self, step: int, kind: tuple = ()) -> bool:
    """Whether metrics.jsonl has a record of `kind` (see `record_kind`) for `step`."""
    return (int(step), tuple(kind)) in self._logged

  def progress(self, step: int, total: int, loss: float, lr: float, examples_per_sec: float,
               fill: tuple, eta_seconds: float) -> None:
    """One line (< 80 columns): step, loss, learning rate, examples/s, input/target fill, ETA.

    (steps/s and tokens/s: metrics.jsonl and TensorBoard.)
    """
    if not self.is_chief:
      return
    print(f'step {step}/{total}  loss {loss:.4f}  lr {lr:.3g}  '
          f'{examples_per_sec:,.0f} ex/s  fill {fill[0]:.0%}/{fill[1]:.0%}  '
          f'ETA {format_eta(eta_seconds)}', file=self.stream, flush=True)

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()


class Throughput:
  """Training-only steps/s and tokens/s: time spent saving or evaluating is left out.

  A token is one position of the batch the model processes: tokens per step =
  BATCH_SIZE x (inputs length + targets length) of the rows (TASK_FEATURE_LENGTHS;
  packed rows: packing.row_lengths), padding included. metrics.jsonl and
  TensorBoard use this definition; examples/s and fill (`batch_counts`) say how
  much of it is real.
  """

  def __init__(self, step: int):
    self._step = step
    self._time = time.perf_counter()
    self._excluded = 0.0
    self.steps = 0          # training steps and seconds since the start (for the ETA)
    self.seconds = 0.0

  def exclude(self, seconds: float) -> None:
    """Leaves `seconds` (a save, an evaluation) out of the current window."""
    self._excluded += seconds

  def rates(self, step: int, tokens_per_step: int) -> tuple[float, float]:
    now = time.perf_counter()
    dt = max(now - self._time - self._excluded, 1e-9)
    steps = step - self._step
    self._step, self._time, self._excluded = step, now, 0.0
    self.steps += steps
    self.seconds += dt
    return steps / dt, steps * tokens_per_step / dt

  def average(self) -> float:
    """Steps/s over every window so far (a steadier base for the ETA than one window)."""
    return self.steps / self.seconds if self.seconds > 0 else 0.0


def events_left(step: int, total: int, period: Optional[int]) -> int:
  """Saves / evals still to come after `step`: every `period` steps and at `total`."""
  if period is None or step >= total:
    return 0
  if period == 0:
    return 1
  return total // period - step // period + (1 if total % period else 0)


def batch_counts(batch: Mapping[str, Any]) -> np.ndarray:
  """[examples, input positions used, input positions, target used, target positions] of a
  host batch: packed rows (segment ids) count their segments, an unpacked row is one example;
  a position is used when it holds an example's token (or a prompt slot reserved for it).
  """
  packed = 'encoder_segment_ids' in batch
  enc = np.asarray(batch['encoder_segment_ids' if packed else 'encoder_input_tokens'])
  dec = np.asarray(batch['decoder_segment_ids' if packed else 'decoder_target_tokens'])
  examples = int(enc.max(axis=1).sum()) if packed else len(enc)
  return np.array([examples, np.count_nonzero(enc), enc.size, np.count_nonzero(dec), dec.size],
                  np.int64)


class PendingMetrics:
  """Train-step metrics left on the device until a log step (no per-step sync)."""

  def __init__(self):
    self._pending: list = []  # (step index, device metrics)

  def add(self, step: int, metrics: Mapping[str, Any]) -> None:
    self._pending.append((step, metrics))

  def fetch(self) -> list:
    """(step index, host metrics) of every step since the last fetch."""
    import jax  # pylint: disable=g-import-not-at-top
    pending, self._pending = self._pending, []
    fetched = jax.device_get([m for _, m in pending])
    return [(s, m) for (s, _), m in zip(pending, fetched)]


class TrainLog:
  """The train metrics of each log window: metrics.jsonl, TensorBoard and the progress line.

  The ETA is the remaining steps at the average training rate, plus the saves and
  evaluations still to come at the duration of the last of each (`pause`).
  """

  def __init__(self, logger: MetricsLogger, *, schedule, start_step: int, total_steps: int,
               tokens_per_step: int, periods: Optional[Mapping[str, Optional[int]]] = None,
               num_processes: int = 1):
    self.logger = logger
    self.num_processes = num_processes  # examples are counted on this process's shard
    self._counts = np.zeros(5, np.int64)  # batch_counts summed over the window
    self.schedule = schedule
    self.total_steps = total_steps
    self.tokens_per_step = tokens_per_step
    self.throughput = Throughput(start_step)
    self.periods = dict(periods or {})
    self._pause_seconds: dict = {}
    self.loss: Optional[float] = None

  def count(self, batch: Mapping[str, Any]) -> None:
    """Adds a batch (this process's shard) to the window's examples and fill."""
    self._counts += batch_counts(batch)

  def pause(self, kind: str, seconds: float) -> None:
    """A save or an evaluation took `seconds`: not training time."""
    self.throughput.exclude(seconds)
    self._pause_seconds[kind] = seconds

  def eta(self, step: int) -> float:
    rate = self.throughput.average()
    if rate <= 0:
      return float('inf')
    pauses = sum(seconds * events_left(step, self.total_steps, self.periods.get(kind))
                 for kind, seconds in self._pause_seconds.items())
    return (self.total_steps - step) / rate + pauses

  def record(self, step: int, fetched: list) -> None:
    """Writes the mean of each scalar over `fetched` (the steps up to `step`).

    The learning rate is the one step `step` used (the last of the window); the
    window's mean goes to metrics.jsonl as `learning_rate_mean`.
    """
    if not fetched:
      return
    steps_per_sec, tokens_per_sec = self.throughput.rates(step, self.tokens_per_step)
    last = fetched[-1][1]
    window = {k: float(np.mean([np.asarray(m[k]) for _, m in fetched]))
              for k in last if np.ndim(last[k]) == 0}
    # The step's non-padding target count is the loss's normaliser, not "tokens".
    if 'num_tokens' in window:
      window['target_tokens'] = window.pop('num_tokens')
    if 'learning_rate' in window:
      window['learning_rate_mean'] = window['learning_rate']
    lr = float(np.asarray(last['learning_rate']) if 'learning_rate' in last
               else self.schedule(step - 1))
    examples, in_used, in_all, tgt_used, tgt_all = self._counts.tolist()
    self._counts[:] = 0
    # Real examples trained per second (all processes); fill: fraction of row positions used.
    examples_per_sec = examples * self.num_processes * steps_per_sec / len(fetched)
    fill = (in_used / max(in_all, 1), tgt_used / max(tgt_all, 1))
    self.logger.write(step, dict(window, learning_rate=lr, steps_per_sec=steps_per_sec,
                                 tokens_per_sec=tokens_per_sec,
                                 examples_per_sec=examples_per_sec, input_fill=fill[0],
                                 target_fill=fill[1]))
    self.logger.progress(step, self.total_steps, window['loss'], lr, examples_per_sec, fill,
                         self.eta(step))
    self.loss = window['loss']
