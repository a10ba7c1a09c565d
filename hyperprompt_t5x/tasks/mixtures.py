"""Mixtures, their ordered task lists, and the task-name -> task-id mapping.

A mixture's task id of a task is its index in `task_names(mixture)`, which is
fixed here (never sorted or derived from the registry):

* `hyperprompt_glue`: cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte (0..7)
* `hyperprompt_super_glue`: boolq, cb, copa, multirc, record, rte, wic, wsc (0..7)
* `hyperprompt_demo`: max, min, has_a (0..2)
* `hyperprompt_demo_conflict`: max, min, max_next, min_next, has_a, missing (0..5)

A task used on its own has task id 0. The MNLI evaluation tasks
(`hyperprompt_glue_mnli_matched` / `_mismatched`) take MNLI's id. Mixing rates
are proportional to the official training sizes, raised to 1/temperature
(`set_temperature`, default 1); the demo tasks mix equally.
"""
import difflib
from typing import Dict, List, Mapping, Optional

import seqio

from . import demo
from . import glue
from . import super_glue

GLUE = 'hyperprompt_glue'
SUPER_GLUE = 'hyperprompt_super_glue'
DEMO = 'hyperprompt_demo'
DEMO_CONFLICT = 'hyperprompt_demo_conflict'


class _Temperature:
  value: float = 1.0


def set_temperature(temperature: float = 1.0) -> None:
  """Temperature of the proportional mixing rates (1: proportional; large: equal)."""
  if not temperature > 0:
    raise ValueError(f'mixing temperature must be > 0, got {temperature}')
  _Temperature.value = float(temperature)


def _counts(mixture: str) -> Dict[str, int]:
  if mixture == GLUE:
    return glue.mixing_counts()
  if mixture == SUPER_GLUE:
    return super_glue.mixing_counts()
  if mixture == DEMO_CONFLICT:
    return {demo.CONFLICT_PREFIX + t: 1 for t in demo.CONFLICT_TASKS}
  return {demo.PREFIX + t: 1 for t in demo.MIXTURE_TASKS}


MIXTURE_TASKS: Mapping[str, List[str]] = {
    GLUE: [glue.PREFIX + t for t in glue.MIXTURE_TASKS],
    SUPER_GLUE: [super_glue.PREFIX + t for t in super_glue.MIXTURE_TASKS],
    DEMO: [demo.PREFIX + t for t in demo.MIXTURE_TASKS],
    DEMO_CONFLICT: [demo.CONFLICT_PREFIX + t for t in demo.CONFLICT_TASKS],
}

# Evaluation stand-ins: a training task -> the tasks that evaluate it (same id).
EVAL_TASKS: Mapping[str, List[str]] = {
    glue.PREFIX + t: [glue.PREFIX + e for e in evals] for t, evals in glue.EVAL_TASKS.items()}
TRAIN_TASK_OF: Mapping[str, str] = {e: t for t, evals in EVAL_TASKS.items() for e in evals}


def rates(mixture: str, temperature: Optional[float] = None) -> Dict[str, float]:
  """Mixing rate per task (unnormalized): count ** (1 / temperature)."""
  t = _Temperature.value if temperature is None else temperature
  return {name: float(n) ** (1.0 / t) for name, n in _counts(mixture).items()}


def _rate_fn(mixture: str):
  return lambda task: rates(mixture)[task.name]


def register() -> List[str]:
  """(Re-)registers the mixtures with seqio (after their tasks)."""
  for name, tasks in MIXTURE_TASKS.items():
    seqio.MixtureRegistry.remove(name)
    seqio.MixtureRegistry.add(name, [(t, _rate_fn(name)) for t in tasks])
  return list(MIXTURE_TASKS)


def registered_names() -> str:
  mixtures = sorted(n for n in seqio.MixtureRegistry.names() if n.startswith('hyperprompt_'))
  tasks = sorted(n for n in seqio.TaskRegistry.names() if n.startswith('hyperprompt_'))
  return f'mixtures: {", ".join(mixtures)}; tasks: {", ".join(tasks)}'


def task_names(mixture_or_task_name: str) -> List[str]:
  """The ordered task list of a mixture (task id = index), or [name] for a task."""
  if mixture_or_task_name in MIXTURE_TASKS:
    return list(MIXTURE_TASKS[mixture_or_task_name])
  if mixture_or_task_name in seqio.TaskRegistry.names():
    return [mixture_or_task_name]
  names = list(MIXTURE_TASKS) + [n for n in seqio.TaskRegistry.names()
                                 if n.startswith('hyperprompt_')]
  close = difflib.get_close_matches(str(mixture_or_task_name), names, n=1)
  hint = f' (did you mean {close[0]!r}?)' if close else ''
  raise ValueError(f'unknown mixture or task {mixture_or_task_name!r}{hint}; registered '
                   f'{registered_names()}')


def task_id(mixture_or_task_name: str, task_name: str) -> int:
  """The id of `task_name` (or of the training task it evaluates) in the mixture."""
  names = task_names(mixture_or_task_name)
  for candidate in (task_name, TRAIN_TASK_OF.get(task_name)):
    if candidate in names:
      return names.index(candidate)
  if len(names) == 1 and task_name in EVAL_TASKS.get(names[0], ()):
    return 0
  raise ValueError(f'{task_name!r} is not in {mixture_or_task_name!r} ({names})')


def eval_task_names(mixture_or_task_name: str) -> List[str]:
  """The tasks to evaluate for a mixture, MNLI expanded to matched + mismatched."""
  out = []
  for name in task_names(mixture_or_task_name):
    out.extend(EVAL_TASKS.get(name, [name]))
  return out
