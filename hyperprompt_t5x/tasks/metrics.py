"""T5's GLUE/SuperGLUE metrics, on top of sklearn and scipy, all in percent.

Each is a seqio metric function `fn(targets, predictions) -> {name: float}` on
postprocessed values; an invalid prediction (-1) never equals a label, so it
counts as wrong. A correlation that is undefined (constant predictions) is
reported as 0.0 rather than NaN so that "best checkpoint" comparisons work.
"""
import collections
import re
import string
from typing import Any, Dict, List, Sequence

import numpy as np
import scipy.stats
import sklearn.metrics


def _finite(value: float) -> float:
  return float(value) if np.isfinite(value) else 0.0


def accuracy(targets: Sequence[Any], predictions: Sequence[Any]) -> Dict[str, float]:
  _check(targets, predictions)
  return {'accuracy': 100.0 * float(np.mean([t == p for t, p in zip(targets, predictions)]))}


def matthews_corrcoef(targets, predictions) -> Dict[str, float]:
  _check(targets, predictions)
  return {'matthews_corrcoef': 100.0 * _finite(
      sklearn.metrics.matthews_corrcoef(targets, predictions))}


def f1_and_accuracy(targets, predictions) -> Dict[str, float]:
  """Binary F1 of class 1 (an invalid prediction is a negative) and accuracy."""
  _check(targets, predictions)
  t = np.asarray(targets) == 1
  p = np.asarray(predictions) == 1
  f1 = sklearn.metrics.f1_score(t, p, zero_division=0.0)
  return {'f1': 100.0 * float(f1), **accuracy(targets, predictions)}


def pearson_and_spearman(targets, predictions) -> Dict[str, float]:
  _check(targets, predictions)
  t = np.asarray(targets, dtype=np.float64)
  p = np.asarray(predictions, dtype=np.float64)
  if len(t) < 2 or np.all(p == p[0]) or np.all(t == t[0]):
    return {'pearson_corrcoef': 0.0, 'spearman_corrcoef': 0.0}
  return {'pearson_corrcoef': 100.0 * _finite(scipy.stats.pearsonr(t, p)[0]),
          'spearman_corrcoef': 100.0 * _finite(scipy.stats.spearmanr(t, p)[0])}


def macro_f1_and_accuracy(num_classes: int):
  """CB: the mean of the per-class F1 over `num_classes` classes, and accuracy."""
  def fn(targets, predictions) -> Dict[str, float]:
    _check(targets, predictions)
    f1 = sklearn.metrics.f1_score(targets, predictions, labels=list(range(num_classes)),
                                  average='macro', zero_division=0.0)
    return {'mean_3class_f1' if num_classes == 3 else 'macro_f1': 100.0 * float(f1),
            **accuracy(targets, predictions)}
  return fn


def multirc(targets: Sequence[Dict], predictions: Sequence[Dict]) -> Dict[str, float]:
  """MultiRC: F1 over all answers (F1a) and exact match of every answer per question."""
  _check(targets, predictions)
  t = [x['value'] for x in targets]
  p = [x['value'] for x in predictions]
  groups: Dict[Any, List[bool]] = collections.defaultdict(list)
  for target, pred in zip(targets, predictions):
    groups[target['group']].append(target['value'] == pred['value'])
  exact = np.mean([all(v) for v in groups.values()])
  return {'f1a': f1_and_accuracy(t, p)['f1'], 'exact_match': 100.0 * float(exact)}


def _normalize_answer(text: str) -> str:
  """SQuAD's normalization: lower case, no punctuation, articles or extra spaces."""
  text = text.lower()
  text = ''.join(ch for ch in text if ch not in set(string.punctuation))
  text = re.sub(r'\b(a|an|the)\b', ' ', text)
  return ' '.join(text.split())


def _token_f1(target: str, prediction: str) -> float:
  t = _normalize_answer(target).split()
  p = _normalize_answer(prediction).split()
  common = collections.Counter(t) & collections.Counter(p)
  same = sum(common.values())
  if same == 0:
    return 0.0
  precision, recall = same / len(p), same / len(t)
  return 2 * precision * recall / (precision + recall)


def squad_max_over_answers(targets: Sequence[Sequence[str]],
                           predictions: Sequence[str]) -> Dict[str, float]:
  """ReCoRD: exact match and token F1, each the max over the acceptable answers."""
  _check(targets, predictions)
  em, f1 = [], []
  for answers, pred in zip(targets, predictions):
    answers = list(answers) or ['<unk>']
    em.append(max(float(_normalize_answer(a) == _normalize_answer(pred)) for a in answers))
    f1.append(max(_token_f1(a, pred) for a in answers))
  return {'em': 100.0 * float(np.mean(em)), 'f1': 100.0 * float(np.mean(f1))}


def _check(targets, predictions):
  if len(targets) != len(predictions):
    raise ValueError(f'{len(targets)} targets but {len(predictions)} predictions')
  if not len(targets):
    raise ValueError('no examples to score')
