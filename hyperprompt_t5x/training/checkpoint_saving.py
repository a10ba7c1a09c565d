"""Saving the train state during training: finite parameters only, with resume data.

Each checkpoint (MODEL_DIR/checkpoint_<step>, written by `train_state.CheckpointStore`)
carries what a resumed run checks and needs: the number of data batches consumed,
the batch size and the model config's fingerprint.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from hyperprompt_t5x.training import divergence
from hyperprompt_t5x.run.metrics_logging import log


class CheckpointSaver:
  """Saves `state` at a step after checking its parameters; remembers the last good one."""

  def __init__(self, store, model_dir: str, config, batch_size: int):
    from hyperprompt_t5x.run import train_state  # pylint: disable=g-import-not-at-top
    self.store = store
    self.model_dir = model_dir
    self.batch_size = batch_size
    self.fingerprint = train_state.config_fingerprint(config)
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
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() > 1:
    raise error
  moved = store.move_aside(step)
  log(f'{error}. Moved it to {moved}; resuming from the newest usable checkpoint.')


def eval_missing(logger, evaluator, start: int, eval_period, train_steps: int) -> bool:
  """Whether the eval due at `start` is not in metrics.jsonl (a kill after its save)."""
  import jax  # pylint: disable=g-import-not-at-top
  due = start > 0 and ((eval_period and start % eval_period == 0) or start == train_steps)
  missing = bool(due) and not logger.logged(start, (evaluator.split,))
  if jax.process_count() > 1:  # only the chief reads metrics.jsonl; all must agree
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    missing = bool(multihost_utils.broadcast_one_to_all(np.int32(missing)))
  return missing
