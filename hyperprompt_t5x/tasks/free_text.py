"""Users' own examples, formatted as a registered task formats its inputs.

A task's text preprocessors (the same ones training used) turn raw examples into
its input text: GLUE / SuperGLUE prefix the benchmark name and each field
(`"sst2 sentence: ..."`); the demo tasks take the text as is. A free example
gives the task's fields (a dict) or, for a task that reads one text field,
just the text. Labels and ids, which only targets and bookkeeping read, are
filled with placeholders.
"""
from typing import Any, List, Mapping, Optional, Sequence, Union

import seqio
import tensorflow as tf

from . import demo
from . import glue
from . import super_glue


def text_fields(task_name: str) -> List[str]:
  """The raw text fields of a task's examples (what a free example must give)."""
  if task_name.startswith(glue.PREFIX) and task_name[len(glue.PREFIX):] in glue.GLUE_TASKS:
    return list(glue.GLUE_TASKS[task_name[len(glue.PREFIX):]].files.text_features)
  if task_name.startswith(super_glue.PREFIX):
    spec = super_glue.SUPER_GLUE_TASKS.get(task_name[len(super_glue.PREFIX):])
    if spec is not None and spec.feature_names:
      return list(spec.feature_names)
  if task_name.startswith(demo.PREFIX) and task_name[len(demo.PREFIX):] in demo.TARGET_FNS:
    return ['inputs']
  return []


def format_inputs(task_name: str, examples: Sequence[Union[str, Mapping[str, Any]]],
                  positions: Optional[Sequence[int]] = None) -> List[str]:
  """Each example's input text as `task_name` formats it (its own preprocessors).

  Errors name the example as `texts[<position>]` (`positions`: each example's
  index in the caller's list; default 0, 1, ...).
  """
  task = seqio.get_mixture_or_task(task_name)
  fields = text_fields(task_name)
  positions = list(range(len(examples))) if positions is None else list(positions)
  rows = []
  for position, example in zip(positions, examples):
    if isinstance(example, str):
      if len(fields) != 1:
        raise ValueError(
            f'texts[{position}]: task {task_name} reads the fields {", ".join(fields) or "?"}; '
            'give one JSON object with them per line (a .jsonl file)')
      example = {fields[0]: example}
    missing = [f for f in fields if f not in example]
    if missing:
      raise ValueError(f'texts[{position}]: task {task_name} needs the field(s) '
                       f'{", ".join(missing)}; got {", ".join(sorted(example)) or "none"}')
    rows.append({k: str(example[k]) for k in fields} if fields else dict(example))
  if not rows:
    return []
  try:
    return _preprocess(task, rows, label=-1)
  except (TypeError, ValueError, tf.errors.OpError):  # a task with float labels (STS-B)
    return _preprocess(task, rows, label=-1.0)


def _preprocess(task, rows: List[dict], label) -> List[str]:
  """The task's preprocessors up to tokenisation, over `rows`; the 'inputs' strings."""
  columns = {k: [row[k] for row in rows] for k in rows[0]}
  columns.setdefault('label', [label] * len(rows))
  columns.setdefault('idx', list(range(len(rows))))
  ds = tf.data.Dataset.from_tensor_slices(columns)
  for preprocessor in task.preprocessors:
    if preprocessor is seqio.preprocessors.tokenize:
      break
    ds = preprocessor(ds)
  return [x['inputs'].decode('utf-8') for x in ds.as_numpy_iterator()]
