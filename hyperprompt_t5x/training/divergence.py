"""Stopping a run whose loss or parameters became NaN or infinite.

The loss is checked whenever the pending step metrics are fetched (log, save and
eval steps), the parameters before every save: nothing non-finite is ever saved,
and the error names the last good checkpoint.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np


class TrainingDivergedError(FloatingPointError):
  """The loss became NaN or infinite; the last good checkpoint is kept."""


def _last_good(last_good_step: Optional[int], model_dir: str) -> str:
  if last_good_step is None:
    return 'none saved yet'
  return f'checkpoint_{last_good_step} in {model_dir}'


def check_losses(fetched: Sequence[tuple], last_good_step: Optional[int],
                 model_dir: str) -> None:
  """`fetched`: (step index, host metrics) pairs; raises at the first non-finite loss."""
  for step, metrics in fetched:
    loss = float(np.asarray(metrics['loss']))
    if not math.isfinite(loss):
      raise TrainingDivergedError(
          f'loss is {loss} at step {step + 1}: training stopped; last good checkpoint: '
          f'{_last_good(last_good_step, model_dir)}. Lower LEARNING_RATE or check the data.')


@jax.jit
def _all_finite(params) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x))
                            for x in jax.tree_util.tree_leaves(params)]))


def check_params(params, step: int, last_good_step: Optional[int], model_dir: str) -> None:
  """Raises if any parameter is NaN/inf (called before saving `step`)."""
  if not bool(_all_finite(params)):
    raise TrainingDivergedError(
        f'parameters became NaN/inf at step {step}: training stopped before saving; '
        f'last good checkpoint: {_last_good(last_good_step, model_dir)}. '
        'Lower LEARNING_RATE or check the data.')
