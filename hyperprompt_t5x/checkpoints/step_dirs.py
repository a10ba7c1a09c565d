"""T5X's checkpoint folder names: MODEL_DIR/checkpoint_<step>.

The one place that writes or parses the name; the step of a checkpoint is the
number in its folder's name, as T5X reads it.
"""
from __future__ import annotations

import os
import re
from typing import Optional, Tuple

from hyperprompt_t5x.checkpoints.errors import CheckpointError

PREFIX = 'checkpoint'
_NAME = re.compile(PREFIX + r'_(\d+)')


def name(step: int) -> str:
  """'checkpoint_<step>'."""
  return f'{PREFIX}_{int(step)}'


def path(model_dir: str | os.PathLike, step: int) -> str:
  """MODEL_DIR/checkpoint_<step>."""
  return os.path.join(os.fspath(model_dir), name(step))


def step_of(folder: str | os.PathLike) -> Optional[int]:
  """The step of a checkpoint_<step> folder (path or name), else None."""
  match = _NAME.fullmatch(os.path.basename(os.path.normpath(os.fspath(folder))))
  return int(match.group(1)) if match else None


def require_step(folder: str | os.PathLike) -> int:
  """The step of a checkpoint_<step> folder; CheckpointError for any other path."""
  step = step_of(folder)
  if step is None:
    raise CheckpointError(f'{folder}: not a {PREFIX}_<step> directory')
  return step


def steps_in(model_dir: str | os.PathLike) -> list:
  """The steps of MODEL_DIR's checkpoint_<step> entries, ascending ([] without MODEL_DIR)."""
  if not os.path.isdir(model_dir):
    return []
  return sorted(s for s in map(step_of, os.listdir(model_dir)) if s is not None)


def split(folder: str | os.PathLike) -> Tuple[str, Optional[int]]:
  """MODEL_DIR or MODEL_DIR/checkpoint_<step> -> (model_dir, step or None)."""
  folder = os.path.normpath(os.fspath(folder))
  step = step_of(folder)
  return (os.path.dirname(folder), step) if step is not None else (folder, None)
