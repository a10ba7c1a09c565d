"""Encoder-decoder feature converter that carries each example's task id.

Input: tokenized examples `{'inputs', 'targets', 'task_id'}` (task_id an int32
scalar). Output: T5X's unpacked encoder-decoder features plus `task_ids`:

  encoder_input_tokens  [len_in]   decoder_target_tokens [len_tgt]
  decoder_input_tokens  [len_tgt]  decoder_loss_weights  [len_tgt]
  task_ids              []         (-> [batch] once batched)

Rows are never packed (pack=True raises), so no row mixes tasks.
`task_feature_lengths` need only 'inputs' and 'targets'.
"""
from typing import Mapping

import seqio
import tensorflow as tf

_Spec = seqio.FeatureConverter.FeatureSpec


class TaskIdEncDecFeatureConverter(seqio.EncDecFeatureConverter):
  """`seqio.EncDecFeatureConverter` (unpacked) + `task_id` -> `task_ids`."""

  TASK_FEATURES = {
      'inputs': _Spec(dtype=tf.int32),
      'targets': _Spec(dtype=tf.int32),
      'task_id': _Spec(dtype=tf.int32, rank=0),
  }
  MODEL_FEATURES = {
      'encoder_input_tokens': _Spec(dtype=tf.int32),
      'decoder_target_tokens': _Spec(dtype=tf.int32),
      'decoder_input_tokens': _Spec(dtype=tf.int32),
      'decoder_loss_weights': _Spec(dtype=tf.int32),
      'task_ids': _Spec(dtype=tf.int32, rank=0),
  }

  def __init__(self, pack: bool = False, **kwargs):
    if pack:
      raise ValueError('TaskIdEncDecFeatureConverter does not pack: a packed row could '
                       'mix tasks, and each row must have one task id.')
    super().__init__(pack=False, **kwargs)

  def __call__(self, ds: tf.data.Dataset,
               task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
    """As seqio's, with `task_id` (a scalar, no length) optional in the lengths."""
    lengths = dict(task_feature_lengths)
    lengths.setdefault('task_id', 1)
    if 'task_id' not in ds.element_spec:
      raise ValueError('examples have no "task_id" feature; build them with '
                       'hyperprompt_t5x.tasks.get_dataset(...) or add it')
    return super().__call__(ds, lengths)

  def _convert_example(self, features):
    # {'inputs': [len_in], 'targets': [len_tgt], 'task_id': []} -> model features
    out = dict(super()._convert_example(features))
    out['task_ids'] = tf.cast(features['task_id'], tf.int32)
    return out

  def _convert_features(self, ds: tf.data.Dataset,
                        task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
    lengths = {k: v for k, v in task_feature_lengths.items() if k != 'task_id'}
    ds = seqio.utils.trim_and_pad_dataset(ds, lengths)
    return ds.map(self._convert_example, num_parallel_calls=tf.data.AUTOTUNE)

  def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]
                                ) -> Mapping[str, int]:
    lengths = dict(super().get_model_feature_lengths(task_feature_lengths))
    lengths['task_ids'] = 1  # a scalar per example; the length is not checked
    return lengths
