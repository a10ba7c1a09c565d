"""Synthetic letter-word tasks: the words and per-task targets of the demo families.

Pure Python (no seqio, no TensorFlow), so benchmarks can build the same data
that `tasks/demo.py` registers with seqio.

Inputs are random "words" of 3-7 letters over a-h with at least two distinct
letters. Two families read the same words:

* `hyperprompt_demo` (DEMO_TARGETS): max, min, has_a; the three answers of a
  word differ, so a model blind to the task id is right about a third of the
  time at best.
* `hyperprompt_demo_conflict` (CONFLICT_TARGETS): six tasks whose answers
  conflict pairwise on every word: max, min, their successors in the
  alphabet (max_next, min_next: a fixed re-mapping of max and min, so they
  share what they must compute but not the answer), has_a, and missing (the
  smallest letter absent from the word; a word has at most 7 of the 8
  letters). Without the task id a model can at best hedge between answers;
  with it, tasks share the letter-set features (transfer) and fight over the
  output mapping (interference).
"""
from typing import Callable, Dict, FrozenSet, List

import numpy as np

ALPHABET = 'abcdefgh'
MIN_LEN, MAX_LEN = 3, 7
SPLIT_SIZES = {'train': 4096, 'validation': 256}
SPLIT_SEEDS = {'train': 0, 'validation': 1}


def _next_letter(c: str) -> str:
  return ALPHABET[(ALPHABET.index(c) + 1) % len(ALPHABET)]


def _missing(word: str) -> str:
  return next(c for c in ALPHABET if c not in word)


DEMO_TARGETS: Dict[str, Callable[[str], str]] = {
    'max': max,
    'min': min,
    'has_a': lambda w: 'y' if 'a' in w else 'n',
}
CONFLICT_TARGETS: Dict[str, Callable[[str], str]] = {
    'max': max,
    'min': min,
    'max_next': lambda w: _next_letter(max(w)),
    'min_next': lambda w: _next_letter(min(w)),
    'has_a': DEMO_TARGETS['has_a'],
    'missing': _missing,
}


def _random_words(seed: int, n: int, exclude: FrozenSet[str] = frozenset()) -> List[str]:
  rng = np.random.RandomState(seed)
  out, seen = [], set(exclude)
  while len(out) < n:
    length = rng.randint(MIN_LEN, MAX_LEN + 1)
    word = ''.join(ALPHABET[i] for i in rng.randint(0, len(ALPHABET), size=length))
    if word not in seen and len(set(word)) > 1:  # max != min
      seen.add(word)
      out.append(word)
  return out


def words(split: str) -> List[str]:
  """The split's words (fixed seeds); validation excludes every training word."""
  if split not in SPLIT_SIZES:
    raise ValueError(f'demo tasks have splits {list(SPLIT_SIZES)}, not {split!r}')
  train = _random_words(SPLIT_SEEDS['train'], SPLIT_SIZES['train'])
  if split == 'train':
    return train
  return _random_words(SPLIT_SEEDS[split], SPLIT_SIZES[split], exclude=frozenset(train))
