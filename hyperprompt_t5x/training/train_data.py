"""The training run's input: the train batch stream (resumable) and the eval sets.

The pipelines are deterministic for a seed, so a resumed run rebuilds the stream
and skips the batches already trained on (packed too: the packer is deterministic
on a deterministic example stream, so batch k holds the same examples). `open_inputs` builds both, and is run in
a background thread while the main thread sets up the model.

seqio / TensorFlow (through `hyperprompt_t5x.tasks`) are imported inside functions.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Iterator, Mapping, Optional

import jax
from hyperprompt_t5x.evaluation import evaluator


def prompt_positions(config) -> int:
  """Encoder positions a packed row reserves per example: prompt tuning's prompt length."""
  return int(config.prompt_length) if config.method == 'prompt_tuning' else 0


def row_lengths(lengths: Mapping[str, int], pack: bool) -> dict:
  """The training rows' {'inputs', 'targets'} lengths (packed: tasks/packing.py's)."""
  if not pack:
    return dict(lengths)
  from hyperprompt_t5x.tasks import packing  # pylint: disable=g-import-not-at-top
  return packing.row_lengths(lengths)


def train_batches(mixture_or_task_name: str, task_feature_lengths, batch_size: int,
                  seed: int, skip: int, shuffle: bool = True, pack: bool = False,
                  reserve: int = 0) -> Iterator[dict]:
  """This process's batches of the (deterministic, repeated) training stream.

  The first `skip` batches (already trained on before a restart) are dropped,
  so a resumed run sees exactly the batches an uninterrupted one would. `pack`:
  rows of several examples of one task (tasks/packing.py), `reserve` encoder
  positions per example for the prompt (`prompt_positions`).
  """
  from hyperprompt_t5x import tasks  # pylint: disable=g-import-not-at-top
  num_shards = jax.process_count()
  if batch_size % num_shards:
    raise ValueError(f'BATCH_SIZE {batch_size} is not divisible by the '
                     f'{num_shards} processes')
  ds = tasks.get_dataset(
      mixture_or_task_name, split='train', task_feature_lengths=task_feature_lengths,
      batch_size=batch_size // num_shards, shuffle=shuffle, seed=seed,
      shard_id=jax.process_index(), num_shards=num_shards, num_epochs=None, pack=pack,
      prompt_positions=reserve)
  if skip and hasattr(ds, 'skip'):  # tf.data: skip without materialising.
    ds = ds.skip(skip)
    skip = 0
  it = ds.as_numpy_iterator() if hasattr(ds, 'as_numpy_iterator') else iter(ds)
  return itertools.islice(it, skip, None)


@dataclasses.dataclass
class TrainInputs:
  """The train stream (its first batch already read) and the eval sets (or None)."""
  batches: Iterator[dict]
  eval_sets: Optional[list]


def open_inputs(mixture_or_task_name: str, lengths: Mapping[str, int], *, batch_size: int,
                seed: int, skip: int, shuffle: bool, eval_split: Optional[str],
                eval_batch_size: int, eval_max_examples: Optional[int], pack: bool = False,
                reserve: int = 0) -> TrainInputs:
  """Builds the pipelines and reads the first batch (so the stream is warm).

  `eval_split=None`: no eval sets. Evaluation is never packed.
  """
  batches = train_batches(mixture_or_task_name, lengths, batch_size, seed, skip=skip,
                          shuffle=shuffle, pack=pack, reserve=reserve)
  first = next(batches)
  sets = None
  if eval_split is not None:
    sets = evaluator.eval_sets(mixture_or_task_name, eval_split, lengths,
                                eval_batch_size, eval_max_examples)
  return TrainInputs(itertools.chain([first], batches), sets)
