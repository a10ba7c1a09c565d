"""T5's text-to-text formats for GLUE and SuperGLUE, as seqio preprocessors.

They read TFDS-shaped examples (either source in `sources.py`) and write
string features `inputs` and `targets`, plus what evaluation needs:

* GLUE/SuperGLUE classification: `"<benchmark> <f1>: <text> <f2>: <text>"`,
  fields sorted by name unless the task fixes the order (MultiRC
  question/answer/paragraph, WiC sentence1/sentence2/word); target = the label
  name, `<unk>` for label -1.
* STS-B: the score rounded to 0.2, one decimal (`"3.8"`).
* MultiRC: `<br>` and `<b>` markup removed; `idx/question` kept for grouping.
* WSC: `*` around span 1 and `#` around span 2 in the text.
* ReCoRD: one example per answer (`<unk>` when none); entities joined by
  ", "; `@highlight` lines turned into sentences; `answers` kept, and
  `record_first_answer` marks one example per query for evaluation.
"""
from typing import Optional, Sequence

import seqio
import tensorflow as tf


def _label_text(label, label_names: Sequence[str]) -> tf.Tensor:
  label = tf.cast(label, tf.int32)
  return tf.cond(tf.equal(label, -1), lambda: tf.constant('<unk>'),
                 lambda: tf.gather(tf.constant(list(label_names)), label))


def glue_text(x, benchmark_name: str, label_names: Sequence[str],
              feature_names: Optional[Sequence[str]] = None):
  """One classification example -> {'inputs', 'targets', 'idx'} in T5's format."""
  names = feature_names or sorted(set(x) - {'label', 'idx'})
  parts = [benchmark_name]
  for name in names:
    parts += [f'{name}:', x[name]]
  inputs = tf.strings.join(parts, separator=' ')
  out = {'inputs': inputs, 'targets': _label_text(x['label'], label_names)}
  if benchmark_name == 'multirc':
    out['inputs'] = tf.strings.regex_replace(
        tf.strings.regex_replace(out['inputs'], '<br>', ' '), '<(/)?b>', '')
    out['idx/paragraph'] = x['idx']['paragraph']
    out['idx/question'] = x['idx']['question']
    out['idx/answer'] = x['idx']['answer']
  else:
    out['idx'] = x['idx']
  return out


@seqio.map_over_dataset
def stsb(x):
  """STS-B: `stsb sentence1: .. sentence2: ..` -> score rounded to 0.2 ("3.8")."""
  inputs = tf.strings.join(['stsb sentence1:', x['sentence1'], 'sentence2:', x['sentence2']],
                           separator=' ')
  score = tf.round(tf.cast(x['label'], tf.float32) * 5.0) / 5.0
  return {'inputs': inputs, 'targets': tf.strings.as_string(score, precision=1),
          'idx': x['idx']}


def _mark_span(text, span_text, span_index, mark: str):
  """Puts `mark` around the span that starts at word `span_index`."""
  pattern = tf.strings.join(
      ['^((?:\\S+\\s){', tf.strings.as_string(span_index), '})(',
       tf.strings.regex_replace(span_text, r'([\\.^$|?*+()\[\]{}])', r'\\\1'), ')'])
  # The pattern is a tensor: regex_replace takes it as such.
  return tf.strings.regex_replace(text, pattern, r'\1' + mark + r' \2 ' + mark)


@seqio.map_over_dataset
def wsc(x):
  """WSC: `wsc text: ..*span1*..#span2#..` -> True/False."""
  text = _mark_span(x['text'], x['span1_text'], x['span1_index'], '*')
  # Marking span 1 adds two words before span 2 when span 1 comes first.
  span2_index = x['span2_index'] + 2 * tf.cast(x['span1_index'] < x['span2_index'], tf.int32)
  text = _mark_span(text, x['span2_text'], span2_index, '#')
  return {'inputs': tf.strings.join(['wsc text:', text], separator=' '),
          'targets': _label_text(x['label'], ('False', 'True')), 'idx': x['idx']}


def record(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """ReCoRD: one example per answer, `record query: .. entities: .. passage: ..`."""

  def per_answer(x):
    answers = x['answers']
    if isinstance(answers, tf.RaggedTensor):
      answers = answers.to_tensor()
    entities = x['entities']
    if isinstance(entities, tf.RaggedTensor):
      entities = entities.to_tensor()
    passage = tf.strings.regex_replace(x['passage'], r'(\.|\?|\!|\"|\')\n@highlight\n', r'\1 ')
    passage = tf.strings.regex_replace(passage, r'\n@highlight\n', '. ')
    inputs = tf.strings.join(
        ['record query:', x['query'], 'entities:',
         tf.strings.reduce_join(entities, separator=', '), 'passage:', passage], separator=' ')
    num = tf.size(answers)
    targets = tf.cond(num > 0, lambda: answers, lambda: tf.constant(['<unk>']))
    n = tf.shape(targets)[0]
    return tf.data.Dataset.from_tensor_slices({
        'inputs': tf.fill([n], inputs),
        'targets': targets,
        'answers': tf.repeat(answers[tf.newaxis], n, axis=0),
        'idx/passage': tf.fill([n], x['idx']['passage']),
        'idx/query': tf.fill([n], x['idx']['query']),
        'record_first_answer': tf.range(n) == 0,
    })

  return dataset.flat_map(per_answer)
