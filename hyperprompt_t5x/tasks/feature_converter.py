"""Encoder-decoder feature converter that carries each example's task id.

Input: tokenized examples `{'inputs', 'targets', 'task_id'}`, task_id an int32
vector of length 1 (every task emits it, see vocab.register_text_task).
Output: T5X's unpacked encoder-decoder features plus `task_ids`:

  encoder_input_tokens  [len_in]   decoder_target_tokens [len_tgt]
  decoder_input_tokens  [len_tgt]  decoder_loss_weights  [len_tgt]
  task_ids              []         (-> [batch] once batched)

With `pack=True` (training) rows are packed per task (packing.py): each row
holds several examples of one task and gains seqio's `encoder_segment_ids`,
`encoder_positions`, `decoder_segment_ids`, `decoder_positions`; `task_ids`
stays one id per row; the targets row is `packing.row_lengths(...)['targets']`.

The same class serves the lean trainer (tasks.get_dataset) and T5X
(`utils.get_dataset` with `utils.DatasetConfig.pack`, `seqio.Evaluator`, as the
model's FEATURE_CONVERTER_CLS). `task_feature_lengths` need only 'inputs' and
'targets'.

`num_tasks` (the model's): an example whose task id is outside [0, num_tasks) stops
the input pipeline with one error naming the id, never reaching the model (a task's id
is its id in its home mixture, so a lone task of a larger mixture would otherwise
gather another row, or none, of the conditioning).
"""
from typing import Mapping, Optional

import seqio
import tensorflow as tf

from . import packing
from .vocab import TASK_ID_FEATURE

# Examples read per step of the packer (one padded batch: fewer Python round trips).
_PACKER_CHUNK = 256

_Spec = seqio.FeatureConverter.FeatureSpec


class TaskIdEncDecFeatureConverter(seqio.EncDecFeatureConverter):
  """`seqio.EncDecFeatureConverter` + `task_id` [1] -> `task_ids` []; packs per task.

  `prompt_positions` (packed rows only): encoder positions reserved at the start
  of each example for the task prompt (prompt tuning's l; see packing.py).
  `bins`: open rows per task while packing. `num_tasks`: ids outside [0, num_tasks)
  are an error.
  """

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

  def __init__(self, pack: bool = False, use_custom_packing_ops: bool = False,
               prompt_positions: int = 0, bins: int = packing.DEFAULT_BINS,
               num_tasks: Optional[int] = None, **kwargs):
    del use_custom_packing_ops  # packing.TaskPacker packs, never seqio's packing ops
    # seqio's own packers need rank-1 features; ours keeps task_ids a scalar per row,
    # which seqio allows with "custom packing ops".
    super().__init__(pack=pack, use_custom_packing_ops=pack, **kwargs)
    self._prompt_positions = int(prompt_positions) if pack else 0
    self._bins = bins
    self._num_tasks = num_tasks

  def __call__(self, ds: tf.data.Dataset,
               task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
    """As seqio's, with `task_id` (always length 1) optional in the lengths."""
    if TASK_ID_FEATURE not in ds.element_spec:
      raise ValueError(
          f'examples have no "{TASK_ID_FEATURE}" feature: use a hyperprompt_t5x.tasks task '
          '(each emits its task id) or add an int32 [1] "task_id" to your task')
    lengths = dict(task_feature_lengths)
    lengths[TASK_ID_FEATURE] = 1
    if self._num_tasks is not None:
      ds = ds.map(self._check_task_id, num_parallel_calls=tf.data.AUTOTUNE)
    return super().__call__(ds, lengths)

  def _check_task_id(self, ex):
    task_id = ex[TASK_ID_FEATURE]
    message = (f'task id out of range [0, num_tasks={self._num_tasks}): a task\'s id is its '
               'id in its home mixture; train it inside that mixture (or with NUM_TASKS = '
               'the mixture\'s task count), or alone with `hyperprompt-t5x train`, which '
               'numbers a lone task 0')
    checks = [tf.debugging.assert_non_negative(task_id, message=message),
              tf.debugging.assert_less(task_id, self._num_tasks, message=message)]
    with tf.control_dependencies(checks):
      return dict(ex, **{TASK_ID_FEATURE: tf.identity(task_id)})

  def _convert_example(self, features):
    # {'inputs': [len_in], 'targets': [len_tgt], 'task_id': [1]} -> model features
    out = dict(super()._convert_example(features))
    out['task_ids'] = tf.cast(features[TASK_ID_FEATURE][0], tf.int32)
    return out

  def _convert_features(self, ds: tf.data.Dataset,
                        task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
    if self.pack:
      return self._packed(ds, task_feature_lengths)
    ds = seqio.utils.trim_and_pad_dataset(ds, task_feature_lengths)
    return ds.map(self._convert_example, num_parallel_calls=tf.data.AUTOTUNE)

  def _packed(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]
              ) -> tf.data.Dataset:
    """Rows of packing.TaskPacker over the example stream, in its order."""
    lengths = {k: task_feature_lengths[k] for k in ('inputs', 'targets')}
    rows = packing.row_lengths(lengths)
    ds = ds.map(lambda ex: {'inputs': ex['inputs'], 'targets': ex['targets'],
                            'n_in': tf.size(ex['inputs']), 'n_tgt': tf.size(ex['targets']),
                            'task_id': ex[TASK_ID_FEATURE][0]},
                num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.padded_batch(_PACKER_CHUNK)
    reserve, bins = self._prompt_positions, self._bins

    def examples():
      for chunk in ds.as_numpy_iterator():
        for i, task_id in enumerate(chunk['task_id']):
          yield (chunk['inputs'][i, :chunk['n_in'][i]],
                 chunk['targets'][i, :chunk['n_tgt'][i]], task_id)

    def generate():
      return packing.TaskPacker(lengths, reserve=reserve, bins=bins).pack(examples())

    signature = {k: tf.TensorSpec([rows['inputs' if k.startswith('encoder') else 'targets']],
                                  tf.int32) for k in packing.ROW_FEATURES}
    signature['task_ids'] = tf.TensorSpec([], tf.int32)
    return tf.data.Dataset.from_generator(generate, output_signature=signature)

  def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]
                                ) -> Mapping[str, int]:
    lengths = {k: v for k, v in task_feature_lengths.items() if k != TASK_ID_FEATURE}
    if self.pack:
      lengths.update(packing.row_lengths(lengths))
    lengths = dict(super().get_model_feature_lengths(lengths))
    lengths['task_ids'] = 1  # a scalar per example; the length is not checked
    return lengths
