"""SuperGLUE tasks `hyperprompt_super_glue_<t>` in T5's text-to-text format.

Source: TFDS `super_glue/<t>` (WSC: `super_glue/wsc.fixed`, as T5), or the
folder of official JSONL files named by `HYPERPROMPT_SUPER_GLUE_DIR`
(`<Task>/train.jsonl`, `val.jsonl`, `test.jsonl`).
"""
import dataclasses
import functools
from typing import Callable, Dict, List, Optional, Sequence

import seqio

from . import metrics
from . import postprocessors
from . import preprocessors
from . import sources
from . import vocab

PREFIX = 'hyperprompt_super_glue_'


@dataclasses.dataclass(frozen=True)
class SuperGlueTask:
  name: str
  folder: str
  tfds_config: str
  label_classes: Optional[Sequence[str]]
  metric_fns: Sequence[Callable]
  num_train_examples: int
  feature_names: Optional[Sequence[str]] = None  # fixed field order, else sorted


_BOOL = ('False', 'True')

SUPER_GLUE_TASKS: Dict[str, SuperGlueTask] = {t.name: t for t in [
    SuperGlueTask('boolq', 'BoolQ', 'boolq', _BOOL, [metrics.accuracy], 9427),
    SuperGlueTask('cb', 'CB', 'cb', ('entailment', 'contradiction', 'neutral'),
                  [metrics.macro_f1_and_accuracy(3)], 250),
    SuperGlueTask('copa', 'COPA', 'copa', ('choice1', 'choice2'), [metrics.accuracy], 400),
    SuperGlueTask('multirc', 'MultiRC', 'multirc', _BOOL, [metrics.multirc], 27243,
                  feature_names=('question', 'answer', 'paragraph')),
    SuperGlueTask('record', 'ReCoRD', 'record', None, [metrics.squad_max_over_answers], 100730),
    SuperGlueTask('rte', 'RTE', 'rte', ('entailment', 'not_entailment'), [metrics.accuracy], 2490),
    SuperGlueTask('wic', 'WiC', 'wic', _BOOL, [metrics.accuracy], 5428,
                  feature_names=('sentence1', 'sentence2', 'word')),
    SuperGlueTask('wsc', 'WSC', 'wsc.fixed', _BOOL, [metrics.accuracy], 554),
]}

MIXTURE_TASKS: List[str] = list(SUPER_GLUE_TASKS)
_SPLIT_FILES = {'train': 'train.jsonl', 'validation': 'val.jsonl', 'test': 'test.jsonl'}


def task_source(task: SuperGlueTask) -> sources.OfflineOrTfdsSource:
  return sources.OfflineOrTfdsSource(
      benchmark='super_glue', tfds_name=f'super_glue/{task.tfds_config}:1.0.2',
      splits={s: f'{task.folder}/{f}' for s, f in _SPLIT_FILES.items()},
      read=sources.super_glue_reader(task.name))


def _text_preprocessor(task: SuperGlueTask):
  if task.name == 'record':
    return preprocessors.record
  if task.name == 'wsc':
    return preprocessors.wsc
  return seqio.map_over_dataset(functools.partial(
      preprocessors.glue_text, benchmark_name=task.name, label_names=task.label_classes,
      feature_names=task.feature_names))


def _postprocessor(task: SuperGlueTask):
  if task.name == 'multirc':
    return postprocessors.multirc
  if task.name == 'record':
    return postprocessors.record
  return postprocessors.class_label_postprocessor(task.label_classes)


def register(vocabulary: seqio.Vocabulary) -> List[str]:
  """(Re-)registers every SuperGLUE task with `vocabulary`; returns their names."""
  return [vocab.register_text_task(
      PREFIX + task.name, vocabulary, source=task_source(task),
      preprocessors=[_text_preprocessor(task)], postprocess_fn=_postprocessor(task),
      metric_fns=task.metric_fns, task_id=MIXTURE_TASKS.index(task.name),
      num_tasks=len(MIXTURE_TASKS)) for task in SUPER_GLUE_TASKS.values()]


def mixing_counts() -> Dict[str, int]:
  return {PREFIX + t: SUPER_GLUE_TASKS[t].num_train_examples for t in MIXTURE_TASKS}
