"""Saving the train state during training: finite parameters only, with resume data.

Each checkpoint (MODEL_DIR/checkpoint_<step>, written by `train_state.CheckpointStore`)
carries what a resumed run checks and needs: the number of data batches consumed,
the batch size and the model config's fingerprint.
"""
from __future__ import annotations

from typing import Optional

from hyperprompt_t5x import divergence


class CheckpointSaver:
  """Saves `state` at a step after checking its parameters; remembers the last good one."""

  def __init__(self, store, model_dir: str, config, batch_size: int):
    from hyperprompt_t5x import train_state  # pylint: disable=g-import-not-at-top
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
