"""Trainer-facing datasets: batches with task ids, eval sets with targets, scoring.

Task ids are attached here, when the dataset is built, from the mixture asked
for (`mixtures.task_id`), so one task can sit in any mixture; a task asked for
on its own gets id 0.
"""
import dataclasses
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import seqio
import tensorflow as tf

from . import feature_converter
from . import mixtures


def _check_lengths(task_feature_lengths: Mapping[str, int]) -> Dict[str, int]:
  missing = {'inputs', 'targets'} - set(task_feature_lengths)
  if missing:
    raise ValueError(f'task_feature_lengths needs "inputs" and "targets", got '
                     f'{dict(task_feature_lengths)}')
  return {'inputs': int(task_feature_lengths['inputs']),
          'targets': int(task_feature_lengths['targets'])}


def _task_split(task: seqio.Task, split: str) -> str:
  """`split`, or MNLI's `<split>_matched` when the task has no plain `<split>`."""
  splits = task.source.splits
  if split in splits:
    return split
  if f'{split}_matched' in splits:
    return f'{split}_matched'
  raise ValueError(f'task {task.name!r} has no split {split!r}; it has {list(splits)}')


def _with_task_id(ds: tf.data.Dataset, task_id: int) -> tf.data.Dataset:
  """The id in the mixture asked for replaces the task's own (its home mixture's).

  Keeps only what the converter needs, so all tasks share one structure.
  """
  return ds.map(lambda ex: {'inputs': ex['inputs'], 'targets': ex['targets'],
                            'task_id': tf.constant([task_id], tf.int32)},
                num_parallel_calls=tf.data.AUTOTUNE)


def get_examples(mixture_or_task_name: str, split: str, task_feature_lengths: Mapping[str, int],
                 shuffle: bool = True, seed: Optional[int] = None, shard_id: int = 0,
                 num_shards: int = 1, num_epochs: Optional[int] = None) -> tf.data.Dataset:
  """Tokenized examples {'inputs', 'targets', 'task_id'} sampled by the mixing rates.

  With `num_epochs=None` each task repeats forever; with a number, the mixture
  ends when every task has given all its examples that many times.
  """
  names = mixtures.task_names(mixture_or_task_name)
  if mixture_or_task_name in mixtures.MIXTURE_TASKS:
    rates = mixtures.rates(mixture_or_task_name)
    weights = [rates[n] for n in names]
  else:
    weights = [1.0] * len(names)
  return mix_examples([(name, split) for name in names], weights, task_feature_lengths,
                      shuffle, seed, shard_id, num_shards, num_epochs)


def mix_examples(task_splits: Sequence[Tuple[str, str]], weights: Sequence[float],
                 task_feature_lengths: Mapping[str, int], shuffle: bool = True,
                 seed: Optional[int] = None, shard_id: int = 0, num_shards: int = 1,
                 num_epochs: Optional[int] = None) -> tf.data.Dataset:
  """Examples of registered (task, split) pairs, task id = index, sampled by `weights`."""
  lengths = _check_lengths(task_feature_lengths)
  shard_info = seqio.ShardInfo(shard_id, num_shards) if num_shards > 1 else None
  datasets = []
  for task_id, (name, split) in enumerate(task_splits):
    task = seqio.get_mixture_or_task(name)
    ds = task.get_dataset(lengths, split=_task_split(task, split), use_cached=False,
                          shuffle=shuffle, seed=None if seed is None else seed + task_id,
                          shard_info=shard_info, num_epochs=num_epochs)
    datasets.append(_with_task_id(ds, task_id))
  if len(datasets) == 1:
    return datasets[0]
  weights = np.array(weights, dtype=np.float64)
  weights = (weights / weights.sum()).tolist()
  # Forever: sample by the rates. A finite number of epochs: every example of
  # every task exactly that often (rates only shape the order).
  return tf.data.Dataset.sample_from_datasets(datasets, weights, seed=seed,
                                              stop_on_empty_dataset=False)


def get_dataset(mixture_or_task_name: str, split: str, task_feature_lengths: Mapping[str, int],
                batch_size: int, shuffle: bool = True, seed: Optional[int] = None,
                shard_id: int = 0, num_shards: int = 1, num_epochs: Optional[int] = None,
                drop_remainder: Optional[bool] = None, pack: bool = False,
                prompt_positions: int = 0) -> tf.data.Dataset:
  """Batches of model features (see feature_converter) with `task_ids` [batch].

  `drop_remainder` defaults to True for split 'train'. `num_epochs=None`
  repeats forever. `pack`: rows of several examples of one task each
  (packing.py), `prompt_positions` encoder positions reserved per example.
  """
  ds = get_examples(mixture_or_task_name, split, task_feature_lengths, shuffle, seed,
                    shard_id, num_shards, num_epochs)
  if drop_remainder is None:
    drop_remainder = split == 'train'
  return batch_examples(ds, task_feature_lengths, batch_size, drop_remainder=drop_remainder,
                        pack=pack, prompt_positions=prompt_positions)


def batch_examples(examples: tf.data.Dataset, task_feature_lengths: Mapping[str, int],
                   batch_size: int, *, drop_remainder: bool, pack: bool = False,
                   prompt_positions: int = 0) -> tf.data.Dataset:
  """get_examples' stream -> batches of model features (packed rows with `pack`)."""
  converter = feature_converter.TaskIdEncDecFeatureConverter(
      pack=pack, prompt_positions=prompt_positions)
  ds = converter(examples, _check_lengths(task_feature_lengths))
  ds = ds.batch(batch_size, drop_remainder=drop_remainder)
  return ds.with_options(_options()).prefetch(tf.data.AUTOTUNE)


def _options() -> tf.data.Options:
  """Fuse and parallelize the per-example maps (about 2x examples/s on 2 cores)."""
  options = tf.data.Options()
  options.experimental_optimization.map_fusion = True
  options.experimental_optimization.map_parallelization = True
  options.experimental_optimization.parallel_batch = True
  return options


@dataclasses.dataclass(frozen=True)
class EvalDataset:
  """One task's evaluation set, in a fixed order.

  `dataset` yields batches of model features (last batch may be short);
  `targets[i]` is the postprocessed target of example i, ready for
  `compute_metrics(name, targets, predictions_text)`; `inputs` the input texts.
  """
  name: str
  task_id: int
  dataset: tf.data.Dataset
  targets: List[Any]
  inputs: List[str]
  num_examples: int


def get_eval_datasets(mixture_or_task_name: str, split: str,
                      task_feature_lengths: Mapping[str, int],
                      batch_size: int) -> List[EvalDataset]:
  """Per-task eval sets (MNLI as matched + mismatched, with MNLI's task id)."""
  lengths = _check_lengths(task_feature_lengths)
  out = []
  for name in mixtures.eval_task_names(mixture_or_task_name):
    task = seqio.get_mixture_or_task(name)
    task_id = mixtures.task_id(mixture_or_task_name, name)
    ds = task.get_dataset(lengths, split=_task_split(task, split), use_cached=False,
                          shuffle=False, num_epochs=1)
    if 'record_first_answer' in ds.element_spec:  # ReCoRD: one example per query
      ds = ds.filter(lambda ex: ex['record_first_answer'])
    ds = ds.cache()
    targets, inputs = [], []
    for ex in ds.as_numpy_iterator():
      text = ex['targets_pretokenized'].decode('utf-8')
      targets.append(task.postprocess_fn(text, example=ex, is_target=True))
      inputs.append(ex['inputs_pretokenized'].decode('utf-8'))
    converted = feature_converter.TaskIdEncDecFeatureConverter()(
        _with_task_id(ds, task_id), lengths)
    out.append(EvalDataset(name=name, task_id=task_id,
                           dataset=converted.batch(batch_size, drop_remainder=False)
                           .with_options(_options()),
                           targets=targets, inputs=inputs, num_examples=len(targets)))
  return out


def decode_predictions(mixture_or_task_name: str, token_ids: Sequence[Sequence[int]]) -> List[str]:
  """Decoded output ids [batch, len] -> texts (cut at EOS, padding dropped)."""
  from . import get_vocabulary  # the package's current vocabulary  # pylint: disable=g-import-not-at-top
  vocabulary = get_vocabulary(mixture_or_task_name)
  return [vocabulary.decode([int(i) for i in row]) for row in np.asarray(token_ids)]


def compute_metrics(task_name: str, targets: Sequence[Any],
                    predictions_text: Sequence[str]) -> Dict[str, float]:
  """The task's metrics: predictions postprocessed as seqio does, then metric_fns."""
  task = seqio.get_mixture_or_task(task_name)
  if not isinstance(task, seqio.Task):
    raise ValueError(f'compute_metrics takes a task name, {task_name!r} is a mixture')
  predictions = [task.postprocess_fn(p, example=None, is_target=False)
                 for p in predictions_text]
  results: Dict[str, float] = {}
  for fn in task.metric_fns:
    results.update(fn(list(targets), predictions))
  return results
