"""A T5X-written MODEL_DIR as a restore source for `hyperprompt-t5x eval` / `infer`.

T5X's train state is {target, state: {step, param_states}} (orbax `state/`
item, or the legacy msgpack `checkpoint` file); this project's CheckpointStore
expects {step, params, opt_state}. `T5XCheckpointStore` offers the two methods
`run_setup.restore_for_inference` uses (`latest_step`, `restore_params`): the
parameters come from the T5X checkpoint (read without t5x,
`t5x_format.load_t5x_params`), checked against the model and placed with its
shardings; T5X's optimizer state is not read.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import jax
import numpy as np

from hyperprompt_t5x.checkpoints import step_dirs, t5x_format, tree_check


def is_t5x_checkpoint(step_dir: str) -> bool:
  """True for a T5X checkpoint dir: a msgpack `checkpoint` file, or an orbax
  `state/` item whose tree has T5X's `target` (the project's has `params`)."""
  if os.path.isfile(os.path.join(step_dir, 'checkpoint')):
    return True
  return _state_item_top_key(step_dir) == 'target'


def is_project_checkpoint(step_dir: str) -> bool:
  """True for a checkpoint dir of this project's trainer: an orbax `state/`
  item whose tree has `params` ({step, params, opt_state}; T5X's has `target`)."""
  return _state_item_top_key(step_dir) == 'params'


def _state_item_top_key(step_dir: str) -> Optional[str]:
  """'target' or 'params' by the local orbax `state/_METADATA` of step_dir, else None."""
  metadata = os.path.join(os.fspath(step_dir), 'state', '_METADATA')
  if os.path.isfile(os.path.join(os.fspath(step_dir), 'checkpoint')) or not os.path.isfile(
      metadata):
    return None
  with open(metadata) as f:
    text = f.read()
  # Keys of the flattened tree, e.g. "('target', 'encoder', ...)"; JSON-escaped.
  has = {key: f"'{key}'" in text for key in ('target', 'params')}
  if has['target'] != has['params']:
    return 'target' if has['target'] else 'params'
  return None


class T5XCheckpointStore:
  """`latest_step` / `restore` over T5X's MODEL_DIR/checkpoint_<step> directories."""

  def __init__(self, model_dir: str):
    self.directory = os.fspath(model_dir)

  def all_steps(self) -> list:
    return step_dirs.steps_in(self.directory)

  def latest_step(self) -> Optional[int]:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def restore_params(self, step: int, target) -> Tuple[object, dict]:
    """(the checkpoint's params, {}) placed as `target` (ShapeDtypeStructs) says."""
    step_dir = step_dirs.path(self.directory, step)
    params = t5x_format.load_t5x_params(step_dir)
    tree_check.check_fits(params, target, f'parameters of {step_dir}',
                          hint=' (a checkpoint of another method, size or number of tasks?)')
    place = lambda x, t: jax.device_put(np.asarray(x, t.dtype), t.sharding)
    return jax.tree_util.tree_map(place, params, target), {}
