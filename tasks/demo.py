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
The words are generated, not shipped: numpy's `RandomState(seed)` with a fixed
seed per split (train 4096 words, validation 256, disjoint). Vocabulary:
always `seqio.ByteVocabulary()` (`vocab.DEMO_VOCABULARY`); inputs are at most
8 tokens with EOS, targets 2. Metric: accuracy (exact string match, percent).
"""
from typing import Callable, Dict, List

import numpy as np
import seqio
import tensorflow as tf

from . import metrics
from . import postprocessors
from . import vocab

PREFIX = 'hyperprompt_demo_'
ALPHABET = 'abcdefgh'
MIN_LEN, MAX_LEN = 3, 7
SPLIT_SIZES = {'train': 4096, 'validation': 256}
_SPLIT_SEEDS = {'train': 0, 'validation': 1}

TARGET_FNS: Dict[str, Callable[[str], str]] = {
    'max': max,
    'min': min,
    'has_a': lambda w: 'y' if 'a' in w else 'n',
}
MIXTURE_TASKS: List[str] = list(TARGET_FNS)


def _random_words(seed: int, n: int, exclude=frozenset()) -> List[str]:
  rng = np.random.RandomState(seed)
  words, seen = [], set(exclude)
  while len(words) < n:
    length = rng.randint(MIN_LEN, MAX_LEN + 1)
    word = ''.join(ALPHABET[i] for i in rng.randint(0, len(ALPHABET), size=length))
    if word not in seen and len(set(word)) > 1:  # max != min
      seen.add(word)
      words.append(word)
  return words


def words(split: str) -> List[str]:
  """The split's words; validation excludes every training word."""
  if split not in SPLIT_SIZES:
    raise ValueError(f'demo tasks have splits {list(SPLIT_SIZES)}, not {split!r}')
  train = _random_words(_SPLIT_SEEDS['train'], SPLIT_SIZES['train'])
  if split == 'train':
    return train
  return _random_words(_SPLIT_SEEDS[split], SPLIT_SIZES[split], exclude=frozenset(train))


def _dataset_fn(task: str):
  target_fn = TARGET_FNS[task]

  def dataset_fn(split: str, shuffle_files: bool, seed=None) -> tf.data.Dataset:
    del shuffle_files, seed  # one in-memory "file"; the Task shuffles examples
    ws = words(split)
    return tf.data.Dataset.from_tensor_slices({
        'inputs': ws, 'targets': [target_fn(w) for w in ws]})
  return dataset_fn


def register() -> List[str]:
  """(Re-)registers the demo tasks (byte vocabulary); returns their names."""
  return [vocab.register_text_task(
      PREFIX + task, vocab.DEMO_VOCABULARY,
      source=seqio.FunctionDataSource(_dataset_fn(task), splits=list(SPLIT_SIZES),
                                      num_input_examples=dict(SPLIT_SIZES)),
      preprocessors=[], postprocess_fn=postprocessors.identity_text,
      metric_fns=[metrics.accuracy], task_id=MIXTURE_TASKS.index(task),
      num_tasks=len(MIXTURE_TASKS)) for task in MIXTURE_TASKS]
