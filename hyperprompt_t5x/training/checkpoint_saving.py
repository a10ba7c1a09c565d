"""Saving the train state during training: finite parameters only, with resume data.

Each checkpoint (MODEL_DIR/checkpoint_<step>, written by `checkpoints.store.CheckpointStore`)
carries what a resumed run checks and needs: the number of data batches consumed,
the batch size and the model config's fingerprint.
"""
from __future__ import annotations

from typing import Optional

import jax

from hyperprompt_t5x.training import divergence
from hyperprompt_t5x.run import model_dir_files
from hyperprompt_t5x.run.metrics_logging import log


class CheckpointSaver:
  """Saves `state` at a step after checking its parameters; remembers the last good one."""

  def __init__(self, store, model_dir: str, config, batch_size: int):
    self.store = store
    self.model_dir = model_dir
    self.batch_size = batch_size
    self.fingerprint = model_dir_files.config_fingerprint(config)
    self.last_good: Optional[int] = store.latest_step()

  def save(self, step: int, state) -> None:
    divergence.check_params(state.params, step, self.last_good, self.model_dir)
    self.store.save(step, state, {'data_batches': step, 'batch_size': self.batch_size,
                                  'fingerprint': self.fingerprint})
    self.last_good = step

  def wait(self) -> None:
    """Blocks until asynchronous saves are on disk."""
    if hasattr(self.store, 'wait'):
      self.store.wait()


def set_aside(store, step: int, error: Exception) -> None:
  """Moves the damaged checkpoint_<step> to MODEL_DIR/damaged/ and says so (never deletes).

  Single-process runs only: with several processes each would have to see the
  damage; they stop with the error instead.
  """
  if jax.process_count() > 1:
    raise error
  moved = store.move_aside(step)
  log(f'{error}. Moved it to {moved}; resuming from the newest usable checkpoint.')

