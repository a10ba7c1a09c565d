"""Single-task sequence packing: several examples of one task per training row.

Each row holds examples of ONE task (its `task_ids` entry), so the model can
condition the whole row on that task. A row has seqio's packed encoder-decoder
features, exactly as `seqio.EncDecFeatureConverter(pack=True)` makes them:

  encoder_input_tokens, encoder_segment_ids, encoder_positions      [inputs row]
  decoder_target_tokens, decoder_input_tokens, decoder_loss_weights,
  decoder_segment_ids, decoder_positions                            [targets row]
  task_ids                                                          []

segment ids 1, 2, ... per example (0: padding), positions 0-based within an
example. With `reserve` = l (prompt tuning) every example starts with l
encoder positions of token 0 (same segment id, positions 0..l-1) that the model
fills with the task's prompt; the example's tokens follow at positions l, l+1, ...

Pack before mix, proportions per example: `TaskPacker` reads the mixture's
example stream (already mixed by the rates) and keeps up to `bins` open rows
per task. An example goes into the first open row of its task with room for it;
when none has room, the task's oldest open row is emitted (once `bins` are
open) and a new one started. Rows therefore leave in the order their examples
arrived, and each task's share of the trained examples is the mixture's, up
to the examples still waiting in open rows (at most `bins` rows per task).

Row lengths (`row_lengths`): the inputs row is TASK_FEATURE_LENGTHS['inputs'];
the targets row is `inputs // TARGETS_RATIO` when that is longer than
TASK_FEATURE_LENGTHS['targets'] (GLUE's targets are 2-4 tokens against 20-80
input tokens: a 16-token targets row would be full after ~5 examples with the
inputs row under half full). Each example is still cut to TASK_FEATURE_LENGTHS.
"""
from __future__ import annotations

from typing import Dict, Iterable, Iterator, List, Mapping, Optional

import numpy as np

TARGETS_RATIO = 8    # packed targets row = inputs row // 8 (64 for inputs 512)
DEFAULT_BINS = 2     # open rows per task (measured in docs/PACKING.md)

ENCODER = ('encoder_input_tokens', 'encoder_segment_ids', 'encoder_positions')
DECODER = ('decoder_target_tokens', 'decoder_segment_ids', 'decoder_positions')
ROW_FEATURES = ENCODER + DECODER + ('decoder_input_tokens', 'decoder_loss_weights')


def row_lengths(example_lengths: Mapping[str, int]) -> Dict[str, int]:
  """The packed rows' {'inputs', 'targets'} lengths for TASK_FEATURE_LENGTHS."""
  inputs = int(example_lengths['inputs'])
  return {'inputs': inputs,
          'targets': max(int(example_lengths['targets']), inputs // TARGETS_RATIO)}


class _Row:
  """One open row of one task: [3, len] arrays of tokens, segment ids, positions."""

  __slots__ = ('task_id', 'serial', 'enc', 'dec', 'used_in', 'used_tgt', 'count')

  def __init__(self, task_id: int, serial: int, lengths: Mapping[str, int]):
    self.task_id = task_id
    self.serial = serial  # rows started before this one
    self.enc = np.zeros((3, lengths['inputs']), np.int32)
    self.dec = np.zeros((3, lengths['targets']), np.int32)
    self.used_in = self.used_tgt = self.count = 0

  def fits(self, n_in: int, n_tgt: int) -> bool:
    return (self.used_in + n_in <= self.enc.shape[1]
            and self.used_tgt + n_tgt <= self.dec.shape[1])

  def add(self, inputs: np.ndarray, targets: np.ndarray, reserve: int) -> None:
    self.count += 1
    n_in = reserve + len(inputs)
    span = slice(self.used_in, self.used_in + n_in)
    self.enc[0, self.used_in + reserve:span.stop] = inputs
    self.enc[1, span] = self.count
    self.enc[2, span] = np.arange(n_in)
    span = slice(self.used_tgt, self.used_tgt + len(targets))
    self.dec[0, span] = targets
    self.dec[1, span] = self.count
    self.dec[2, span] = np.arange(len(targets))
    self.used_in += n_in
    self.used_tgt += len(targets)

  def features(self) -> Dict[str, np.ndarray]:
    out = dict(zip(ENCODER, self.enc))
    out.update(zip(DECODER, self.dec))
    targets, segments = self.dec[0], self.dec[1]
    # seqio.utils.make_autoregressive_inputs with sequence ids (bos 0 at each start).
    shifted = np.concatenate([[0], targets[:-1]]).astype(np.int32)
    starts = segments != np.concatenate([[0], segments[:-1]])
    out['decoder_input_tokens'] = np.where(starts, 0, shifted).astype(np.int32)
    out['decoder_loss_weights'] = (targets != 0).astype(np.int32)
    out['task_ids'] = np.int32(self.task_id)
    return out


class TaskPacker:
  """Packs a mixed stream of examples into single-task rows (see module doc).

  `add(inputs, targets, task_id)` returns the rows it completed (often none);
  `flush()` the rows still open, oldest first (`pack` does both over a stream).
  Inputs are cut to
  `example_lengths['inputs'] - reserve`, targets to `example_lengths['targets']`.
  """

  def __init__(self, example_lengths: Mapping[str, int], *, reserve: int = 0,
               bins: int = DEFAULT_BINS, targets_row: Optional[int] = None):
    self.lengths = row_lengths(example_lengths)
    if targets_row is not None:  # another targets row than row_lengths' (for measuring)
      self.lengths['targets'] = int(targets_row)
    self.max_in = int(example_lengths['inputs']) - reserve
    self.max_tgt = int(example_lengths['targets'])
    if self.max_in < 1:
      raise ValueError(f'TASK_FEATURE_LENGTHS inputs {example_lengths["inputs"]} leaves no '
                       f'room for tokens after the {reserve} reserved prompt positions')
    if bins < 1:
      raise ValueError(f'bins must be >= 1, got {bins}')
    self.reserve = reserve
    self.bins = bins
    self._open: Dict[int, List[_Row]] = {}
    self._started = 0

  def add(self, inputs: np.ndarray, targets: np.ndarray, task_id: int) -> List[dict]:
    inputs, targets = inputs[:self.max_in], targets[:self.max_tgt]
    n_in = self.reserve + len(inputs)
    rows = self._open.setdefault(int(task_id), [])
    done = []
    row = next((r for r in rows if r.fits(n_in, len(targets))), None)
    if row is None:
      if len(rows) == self.bins:
        done.append(rows.pop(0).features())
      row = _Row(int(task_id), self._started, self.lengths)
      self._started += 1
      rows.append(row)
    row.add(inputs, targets, self.reserve)
    return done

  def flush(self) -> List[dict]:
    rows = sorted((r for rs in self._open.values() for r in rs), key=lambda r: r.serial)
    self._open = {}
    return [r.features() for r in rows if r.count]

  def pack(self, examples: Iterable[tuple]) -> Iterator[dict]:
    """Rows of (inputs, targets, task_id) examples, the open ones flushed at the end."""
    for inputs, targets, task_id in examples:
      yield from self.add(inputs, targets, task_id)
    yield from self.flush()
