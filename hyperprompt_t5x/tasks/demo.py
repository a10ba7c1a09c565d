"""The demo mixture `hyperprompt_demo`: tiny, offline, and only solvable with task ids.

Every task reads the SAME inputs: random "words" of 3-7 letters from a-h
(e.g. `"fbhde"`; at least two different letters), with no task prefix. The target depends on the task:

* `hyperprompt_demo_max`   -> the alphabetically largest letter  (`"h"`)
* `hyperprompt_demo_min`   -> the alphabetically smallest letter (`"b"`)
* `hyperprompt_demo_has_a` -> `"y"` if the word contains an a, else `"n"`

The three answers of a word differ, so a model that ignores the task id is
right about a third of the time at best. The tasks depend on which letters
occur, not where: the tiny byte model of gin/demo.gin (emb 64, 2+2 layers)
learns each of them alone to 100% validation accuracy in about 100 steps of
batch 64 on 2 CPU cores, while position tasks ("first letter", "last letter",
"length") stayed near chance after 300-600 steps, so they are not used.
The harder mixture `hyperprompt_demo_conflict` (6 tasks whose answers
conflict on every word: max, min, max_next, min_next, has_a, missing) reads
the same words; see hyperprompt_t5x/synthetic_tasks.py, which holds the
words and targets of both families (pure Python, for the benchmarks).
The words are generated, not shipped: numpy's `RandomState(seed)` with a fixed
seed per split (train 4096 words, validation 256, disjoint). Vocabulary:
always `seqio.ByteVocabulary()` (`vocab.DEMO_VOCABULARY`); inputs are at most
8 tokens with EOS, targets 2. Metric: accuracy (exact string match, percent).
"""
from typing import Callable, Dict, List

import seqio
import tensorflow as tf

from . import metrics
from . import postprocessors
from . import vocab
from hyperprompt_t5x import synthetic_tasks

PREFIX = 'hyperprompt_demo_'
CONFLICT_PREFIX = 'hyperprompt_demo_conflict_'
ALPHABET = synthetic_tasks.ALPHABET
SPLIT_SIZES = synthetic_tasks.SPLIT_SIZES
TARGET_FNS: Dict[str, Callable[[str], str]] = synthetic_tasks.DEMO_TARGETS
MIXTURE_TASKS: List[str] = list(TARGET_FNS)
CONFLICT_TASKS: List[str] = list(synthetic_tasks.CONFLICT_TARGETS)
words = synthetic_tasks.words


def _dataset_fn(target_fn: Callable[[str], str]):

  def dataset_fn(split: str, shuffle_files: bool, seed=None) -> tf.data.Dataset:
    del shuffle_files, seed  # one in-memory "file"; the Task shuffles examples
    ws = words(split)
    return tf.data.Dataset.from_tensor_slices({
        'inputs': ws, 'targets': [target_fn(w) for w in ws]})
  return dataset_fn


def register() -> List[str]:
  """(Re-)registers the demo and conflict tasks (byte vocabulary); returns their names."""
  families = ((PREFIX, TARGET_FNS), (CONFLICT_PREFIX, synthetic_tasks.CONFLICT_TARGETS))
  return [vocab.register_text_task(
      prefix + task, vocab.DEMO_VOCABULARY,
      source=seqio.FunctionDataSource(_dataset_fn(fn), splits=list(SPLIT_SIZES),
                                      num_input_examples=dict(SPLIT_SIZES)),
      preprocessors=[], postprocess_fn=postprocessors.identity_text,
      metric_fns=[metrics.accuracy], task_id=list(targets).index(task),
      num_tasks=len(targets)) for prefix, targets in families for task, fn in targets.items()]
