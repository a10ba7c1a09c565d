"""Encoder-decoder feature converter that carries each example's task id.

Input: tokenized examples `{'inputs', 'targets', 'task_id'}`, task_id an int32
vector of length 1 (every task emits it, see vocab.register_text_task).
Output: T5X's unpacked encoder-decoder features plus `task_ids`:

  encoder_input_tokens  [len_in]   decoder_target_tokens [len_tgt]
  decoder_input_tokens  [len_tgt]  decoder_loss_weights  [len_tgt]
  task_ids              []         (-> [batch] once batched)

The same class serves the lean trainer (tasks.get_dataset) and T5X
(`utils.get_dataset`, `seqio.Evaluator`, as the model's FEATURE_CONVERTER_CLS).
Rows are never packed (pack=True raises: a packed row would mix tasks).
`task_feature_lengths` need only 'inputs' and 'targets'.
"""
from typing import Mapping

import seqio
import tensorflow as tf

from .vocab import TASK_ID_FEATURE

_Spec = seqio.FeatureConverter.FeatureSpec


class TaskIdEncDecFeatureConverter(seqio.EncDecFeatureConverter):
  """`seqio.EncDecFeatureConverter` (unpacked) + `task_id` [1] -> `task_ids` []."""

  TASK_FEATURES = {
      'inputs': _Spec(dtype=tf.int32),
      'targets': _Spec(dtype=tf.int32),
      TASK_ID_FEATURE: _Spec(dtype=tf.int32),
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
      raise ValueError(
          'TaskIdEncDecFeatureConverter does not pack: a packed row could mix tasks and '
          'each row needs one task id; under T5X set utils.DatasetConfig.pack = False '
          '(T5X\'s finetune.gin sets it True for train and train_eval).')
    super().__init__(pack=False, **kwargs)

  def __call__(self, ds: tf.data.Dataset,
               task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
    """As seqio's, with `task_id` (always length 1) optional in the lengths."""
    if TASK_ID_FEATURE not in ds.element_spec:
      raise ValueError(
          f'examples have no "{TASK_ID_FEATURE}" feature: use a hyperprompt_t5x.tasks task '
          '(each emits its task id) or add an int32 [1] "task_id" to your task')
    lengths = dict(task_feature_lengths)
    lengths[TASK_ID_FEATURE] = 1
    return super().__call__(ds, lengths)

  def _convert_example(self, features):
    # {'inputs': [len_in], 'targets': [len_tgt], 'task_id': [1]} -> model features
    out = dict(super()._convert_example(features))
    out['task_ids'] = tf.cast(features[TASK_ID_FEATURE][0], tf.int32)
    return out

  def _convert_features(self, ds: tf.data.Dataset,
                        task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
    ds = seqio.utils.trim_and_pad_dataset(ds, task_feature_lengths)
    return ds.map(self._convert_example, num_parallel_calls=tf.data.AUTOTUNE)

  def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]
                                ) -> Mapping[str, int]:
    lengths = {k: v for k, v in task_feature_lengths.items() if k != TASK_ID_FEATURE}
    lengths = dict(super().get_model_feature_lengths(lengths))
    lengths['task_ids'] = 1  # a scalar per example; the length is not checked
    return lengths
