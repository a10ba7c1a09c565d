"""A T5X-written MODEL_DIR as a restore source for `hyperprompt-t5x eval` / `infer`.

T5X's train state is {target, state: {step, param_states}} (orbax `state/`
item, or the legacy msgpack `checkpoint` file); this project's CheckpointStore
expects {step, params, opt_state}. `T5XCheckpointStore` offers the two methods
`run_setup.build_run` uses (`latest_step`, `restore`): the parameters come from
the T5X checkpoint (read without t5x, `t5x_format.load_t5x_params`),
checked against the model and placed with its shardings; the optimizer state
is a zero state of the project's optimizer (eval and infer do not read it).
"""
from __future__ import annotations

import os
import re
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from hyperprompt_t5x.checkpoints import t5x_format
from hyperprompt_t5x.checkpoints.t5x_format import CheckpointError

_STEP_DIR = re.compile(r'checkpoint_(\d+)')


def is_t5x_checkpoint(step_dir: str) -> bool:
  """True for a T5X checkpoint dir: a msgpack `checkpoint` file, or an orbax
  `state/` item whose tree has T5X's `target` (the project's has `params`)."""
  if os.path.isfile(os.path.join(step_dir, 'checkpoint')):
    return True
  return _state_item_top_key(step_dir) == 'target'


def step_of(step_dir: str) -> int:
  """The step of a MODEL_DIR/checkpoint_<step> directory, by its name (as T5X reads it)."""
  match = _STEP_DIR.fullmatch(os.path.basename(os.path.normpath(os.fspath(step_dir))))
  if not match:
    raise CheckpointError(f'{step_dir}: not a checkpoint_<step> directory')
  return int(match.group(1))


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
    return sorted(int(m.group(1)) for m in map(_STEP_DIR.fullmatch, os.listdir(self.directory))
                  if m)

  def latest_step(self) -> Optional[int]:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def restore(self, step: int, target) -> Tuple[object, dict]:
    """(TrainState with the checkpoint's params, {}) placed as `target` says."""
    from hyperprompt_t5x.run import train_state  # pylint: disable=g-import-not-at-top
    step_dir = os.path.join(self.directory, f'checkpoint_{step}')
    params = t5x_format.load_t5x_params(step_dir)
    try:
      train_state._check_params_match(  # pylint: disable=protected-access
          params, target.params, f'parameters of {step_dir}')
    except ValueError as e:
      raise CheckpointError(f'{e} (a checkpoint of another method, size or number of '
                            'tasks?)') from e
    place = lambda x, t: jax.device_put(np.asarray(x, t.dtype), t.sharding)
    zeros = lambda t: jax.device_put(jnp.zeros(t.shape, t.dtype), t.sharding)
    state = target.replace(
        step=jax.device_put(jnp.asarray(step, target.step.dtype), target.step.sharding),
        params=jax.tree_util.tree_map(place, params, target.params),
        opt_state=jax.tree_util.tree_map(zeros, target.opt_state))
    return state, {}
