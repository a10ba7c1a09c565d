"""seqio postprocessors: decoded text -> the values the metrics compare.

Signature `fn(text, example=None, is_target=False)` as seqio calls it. Text a
model may produce that is no label maps to -1 (never an exception), which the
metrics count as wrong.
"""
import functools
import math
from typing import Any, Mapping, Optional, Sequence


def _text(value) -> str:
  if isinstance(value, bytes):
    return value.decode('utf-8', errors='replace')
  return str(value)


def string_label_to_class_id(text, example: Optional[Mapping[str, Any]] = None,
                             is_target: bool = False, *,
                             label_classes: Sequence[str]) -> int:
  """The index of `text` in `label_classes`, or -1 for anything else."""
  del example, is_target
  text = _text(text).strip()
  return label_classes.index(text) if text in label_classes else -1


def class_label_postprocessor(label_classes: Sequence[str]):
  return functools.partial(string_label_to_class_id, label_classes=tuple(label_classes))


def string_to_float(text, example=None, is_target=False, default: float = -1.0) -> float:
  """A float, or `default` for text that is no finite number (STS-B)."""
  del example, is_target
  try:
    value = float(_text(text).strip())
  except ValueError:
    return default
  return value if math.isfinite(value) else default


def multirc(text, example=None, is_target=False) -> dict:
  """{'value': 0/1/-1} and, for targets, the question `group` to score per question."""
  out = {'value': string_label_to_class_id(text, label_classes=('False', 'True'))}
  if is_target:
    out['group'] = (int(example['idx/paragraph']), int(example['idx/question']))
  return out


def record(text, example=None, is_target=False):
  """Predictions: the text; targets: the list of acceptable answers."""
  if is_target:
    answers = [_text(a) for a in example['answers']]
    return answers
  return _text(text)


def identity_text(text, example=None, is_target=False) -> str:
  """The stripped text (demo tasks compare strings)."""
  del example, is_target
  return _text(text).strip()
