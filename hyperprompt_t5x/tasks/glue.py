"""GLUE tasks `hyperprompt_glue_<t>` in T5's text-to-text format.

Source: TFDS `glue/<t>`, or the download_glue_data.py folder named by
`HYPERPROMPT_GLUE_DIR` (see `sources.py`). MNLI trains as
`hyperprompt_glue_mnli` (splits train, validation_matched, ...) and is
evaluated as `hyperprompt_glue_mnli_matched` / `_mismatched` (split
`validation`), which share MNLI's task id in a mixture.
"""
import dataclasses
import functools
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import seqio

from . import metrics
from . import postprocessors
from . import preprocessors
from . import sources
from . import vocab

PREFIX = 'hyperprompt_glue_'


@dataclasses.dataclass(frozen=True)
class GlueTask:
  """One GLUE task: files, TFDS config, labels, metrics."""
  name: str                          # t in hyperprompt_glue_<t>
  tfds_config: str                   # glue/<tfds_config>
  benchmark: str                     # the T5 input prefix
  files: sources.GlueFiles
  metric_fns: Sequence[Callable]
  num_train_examples: int = 0        # official train size (mixing rate)


def _files(folder, text_features, label_column, label_classes, splits=None, **kw):
  splits = splits or {'train': 'train.tsv', 'validation': 'dev.tsv', 'test': 'test.tsv'}
  return sources.GlueFiles(folder=folder, files={s: f'{folder}/{f}' for s, f in splits.items()},
                           text_features=text_features, label_column=label_column,
                           label_classes=label_classes, **kw)


_MNLI_LABELS = ('entailment', 'neutral', 'contradiction')
_MNLI_TEXT = {'premise': 'sentence1', 'hypothesis': 'sentence2'}
_PAIR = {'sentence1': 'sentence1', 'sentence2': 'sentence2'}

GLUE_TASKS: Dict[str, GlueTask] = {t.name: t for t in [
    GlueTask('cola', 'cola', 'cola',
             _files('CoLA', {'sentence': 'sentence'}, 'is_acceptable',
                    ('unacceptable', 'acceptable'), headerless=True),
             [metrics.matthews_corrcoef], 8551),
    GlueTask('sst2', 'sst2', 'sst2',
             _files('SST-2', {'sentence': 'sentence'}, 'label', ('negative', 'positive')),
             [metrics.accuracy], 67349),
    GlueTask('mrpc', 'mrpc', 'mrpc',
             _files('MRPC', {'sentence1': '#1 String', 'sentence2': '#2 String'}, 'Quality',
                    ('not_equivalent', 'equivalent')),
             [metrics.f1_and_accuracy], 3668),
    GlueTask('qqp', 'qqp', 'qqp',
             _files('QQP', {'question1': 'question1', 'question2': 'question2'}, 'is_duplicate',
                    ('not_duplicate', 'duplicate')),
             [metrics.f1_and_accuracy], 363849),
    GlueTask('stsb', 'stsb', 'stsb', _files('STS-B', _PAIR, 'score', None),
             [metrics.pearson_and_spearman], 5749),
    GlueTask('mnli', 'mnli', 'mnli',
             _files('MNLI', _MNLI_TEXT, 'gold_label', _MNLI_LABELS, splits={
                 'train': 'train.tsv',
                 'validation_matched': 'dev_matched.tsv',
                 'validation_mismatched': 'dev_mismatched.tsv',
                 'test_matched': 'test_matched.tsv',
                 'test_mismatched': 'test_mismatched.tsv'}),
             [metrics.accuracy], 392702),
    GlueTask('qnli', 'qnli', 'qnli',
             _files('QNLI', {'question': 'question', 'sentence': 'sentence'}, 'label',
                    ('entailment', 'not_entailment')),
             [metrics.accuracy], 104743),
    GlueTask('rte', 'rte', 'rte', _files('RTE', _PAIR, 'label', ('entailment', 'not_entailment')),
             [metrics.accuracy], 2490),
    GlueTask('wnli', 'wnli', 'wnli',
             _files('WNLI', _PAIR, 'label', ('not_entailment', 'entailment')),
             [metrics.accuracy], 635),
    GlueTask('mnli_matched', 'mnli_matched', 'mnli',
             _files('MNLI', _MNLI_TEXT, 'gold_label', _MNLI_LABELS,
                    splits={'validation': 'dev_matched.tsv', 'test': 'test_matched.tsv'}),
             [metrics.accuracy]),
    GlueTask('mnli_mismatched', 'mnli_mismatched', 'mnli',
             _files('MNLI', _MNLI_TEXT, 'gold_label', _MNLI_LABELS,
                    splits={'validation': 'dev_mismatched.tsv', 'test': 'test_mismatched.tsv'}),
             [metrics.accuracy]),
]}

# The mixture's training tasks, in task-id order (WNLI is left out, as in T5 and the paper).
MIXTURE_TASKS: List[str] = ['cola', 'sst2', 'mrpc', 'qqp', 'stsb', 'mnli', 'qnli', 'rte']
# Evaluation stand-ins: the MNLI task is evaluated on matched and mismatched.
EVAL_TASKS: Mapping[str, Sequence[str]] = {
    'mnli': ('mnli_matched', 'mnli_mismatched')}


def task_source(task: GlueTask) -> sources.OfflineOrTfdsSource:
  return sources.OfflineOrTfdsSource(
      benchmark='glue', tfds_name=f'glue/{task.tfds_config}:2.0.0', splits=task.files.files,
      read=sources.glue_reader(task.files))


def _text_preprocessor(task: GlueTask):
  if task.name == 'stsb':
    return preprocessors.stsb
  return seqio.map_over_dataset(functools.partial(
      preprocessors.glue_text, benchmark_name=task.benchmark,
      label_names=task.files.label_classes))


def _postprocessor(task: GlueTask):
  if task.name == 'stsb':
    return postprocessors.string_to_float
  return postprocessors.class_label_postprocessor(task.files.label_classes)


def home_task_id(name: str) -> int:
  """The task's id in `hyperprompt_glue` (MNLI's for its eval tasks; WNLI: 0, alone)."""
  train = next((t for t, evals in EVAL_TASKS.items() if name in evals), name)
  return MIXTURE_TASKS.index(train) if train in MIXTURE_TASKS else 0


def register(vocabulary: seqio.Vocabulary) -> List[str]:
  """(Re-)registers every GLUE task with `vocabulary`; returns their names."""
  return [vocab.register_text_task(
      PREFIX + task.name, vocabulary, source=task_source(task),
      preprocessors=[_text_preprocessor(task)], postprocess_fn=_postprocessor(task),
      metric_fns=task.metric_fns, task_id=home_task_id(task.name),
      num_tasks=len(MIXTURE_TASKS)) for task in GLUE_TASKS.values()]


def mixing_counts() -> Dict[str, int]:
  """Official train sizes of the mixture tasks (the proportional rates)."""
  return {PREFIX + t: GLUE_TASKS[t].num_train_examples for t in MIXTURE_TASKS}


def label_classes(name: str) -> Optional[Sequence[str]]:
  return GLUE_TASKS[name].files.label_classes
