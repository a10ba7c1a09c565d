"""Each macro's accepted values, checked after the gin files are parsed and before
anything runs or is written.

`SPECS` is the one table: a macro's type and range, in words (`accepted`, shown by
`--help` and docs/CLI.md) and as a test (`ok`). An error names the macro, the
value it got and what it accepts, e.g.
`TRAIN_STEPS='abc' is not accepted: TRAIN_STEPS takes an integer >= 1`.
Whether a named mixture, file or checkpoint exists is checked where it is used,
also before anything is written.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

from hyperprompt_t5x import gin_config, optim
from hyperprompt_t5x.model.methods import METHODS


@dataclasses.dataclass(frozen=True)
class Spec:
  accepted: str                 # the accepted values, in words
  ok: Callable[[Any], bool]     # does a value fit


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))


def integer(minimum: int, optional: Optional[str] = None) -> Spec:
  """An int >= minimum; `optional`: None is accepted too and means this."""
  words = f'an integer >= {minimum}' + (f', or None ({optional})' if optional else '')
  return Spec(words, lambda v: (optional is not None and v is None)
              or (_is_int(v) and v >= minimum))


def number(low: float, high: Optional[float] = None, *, low_open: bool = False) -> Spec:
  """A finite number in [low, high) (or (low, ...) with `low_open`)."""
  words = f'a number {">" if low_open else ">="} {low:g}' + (
      f' and < {high:g}' if high is not None else '')
  return Spec(words, lambda v: _is_number(v) and (v > low if low_open else v >= low)
              and (high is None or v < high))


def choice(options) -> Spec:
  return Spec('one of ' + ', '.join(repr(o) for o in options), lambda v: v in tuple(options))


def text(kind: str, optional: Optional[str] = None) -> Spec:
  """A non-empty string (described as `kind`); `optional`: None too, meaning this."""
  words = kind + (f', or None ({optional})' if optional else '')
  return Spec(words, lambda v: (optional is not None and v is None)
              or (isinstance(v, str) and bool(v.strip())))


BOOLEAN = Spec('True or False', lambda v: isinstance(v, bool))
LENGTHS = Spec("{'inputs': integer >= 1, 'targets': integer >= 1}",
               lambda v: isinstance(v, dict) and set(v) == {'inputs', 'targets'}
               and all(_is_int(x) and x >= 1 for x in v.values()))

SPECS = {
    # runs/finetune.gin
    'MODEL_DIR': text('a folder path (local or gs://)'),
    'MIXTURE_OR_TASK_NAME': text('a registered task or mixture name'),
    'TASK_FEATURE_LENGTHS': LENGTHS,
    'TRAIN_STEPS': integer(1),
    'BATCH_SIZE': integer(1),
    'INITIAL_CHECKPOINT_PATH': text('a checkpoint path', 'start from scratch'),
    'RESTORE_OPTIMIZER_STATE': BOOLEAN,
    'CALIBRATE_PROMPT_SCALE': BOOLEAN,
    'SAVE_PERIOD': integer(1),
    'KEEP_CHECKPOINTS': integer(1, 'keep all'),
    'EVAL_PERIOD': integer(0, 'never evaluate'),
    'EVAL_SPLIT': text('a split name, e.g. \'validation\''),
    'EVAL_BATCH_SIZE': integer(1),
    'EVAL_MAX_EXAMPLES': integer(1, 'the whole split'),
    'LOG_PERIOD': integer(1),
    'OPTIMIZER': choice(optim.OPTIMIZERS),
    'LEARNING_RATE': number(0, low_open=True),
    'LR_SCHEDULE': choice(optim.SCHEDULES),
    'WARMUP_STEPS': integer(0),
    'WEIGHT_DECAY': number(0),
    'FREEZE': choice(optim.FREEZE_MODES),
    'Z_LOSS': number(0),
    'LABEL_SMOOTHING': number(0, 1),
    'NUM_PARTITIONS': integer(1),
    'SEED': integer(0),
    'USE_HARDWARE_RNG': BOOLEAN,
    'PACK': BOOLEAN,
    'XLA_FLAGS': text('XLA flags in one string', 'none'),
    # runs/eval.gin, runs/infer.gin
    'CHECKPOINT_PATH': text('a MODEL_DIR/checkpoint_<step> path', 'the newest in MODEL_DIR'),
    'INFER_OUTPUT_PATH': text('a file path', 'MODEL_DIR/predictions_<split>_<step>.jsonl'),
    # methods/conditioning.gin, models/*.gin
    'METHOD': choice(METHODS),
    'NUM_TASKS': integer(1),
    'PROMPT_LENGTH': integer(1),
    'BOTTLENECK': integer(1),
    'ADAPTER_DIM': integer(1),
    'DROPOUT_RATE': number(0, 1),
}


def problem(name: str, value: Any) -> Optional[str]:
  """Why `value` does not fit macro `name` (one line), or None when it does."""
  spec = SPECS.get(name)
  if spec is None or spec.ok(value):
    return None
  return f'{name}={value!r} is not accepted: {name} takes {spec.accepted}'


def check_defined() -> None:
  """Checks every macro the parsed gin config defines (and has a value) against SPECS."""
  import gin  # pylint: disable=g-import-not-at-top
  for name in gin_config.defined_macros():
    value = gin.query_parameter(f'%{name}')
    if isinstance(value, gin.config.ConfigurableReference):
      continue  # gin.REQUIRED or a reference: check_required / gin see to it
    message = problem(name, value)
    if message:
      raise gin_config.GinConfigError(message)


def check_given(macros) -> None:
  """Checks `--gin.NAME=value` pairs themselves (where no gin config is parsed yet)."""
  for name, text in macros:
    message = problem(name, gin_config.macro_value(text))
    if message:
      raise gin_config.GinConfigError(message)
