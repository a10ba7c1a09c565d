"""The train step, made as soon as the run's plan is known and compiled ahead of time.

Compilation dominates short runs. `TrainStepBuilder.on_plan` is `build_run`'s hook:
it makes the jitted train step from the plan (shapes and shardings, no parameters
yet) and compiles it in a worker thread while the main thread initialises or
restores the parameters. The compiled program lands in jit's cache, so the first
real step does not compile again.
"""
from __future__ import annotations

import concurrent.futures
import time
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp

from hyperprompt_t5x.run.metrics_logging import log
from hyperprompt_t5x import partitioning
from hyperprompt_t5x.run import train_state


def batch_spec(mesh, batch_size: int, lengths: Mapping[str, int], packed: bool = False) -> dict:
  """The train batch as sharded ShapeDtypeStructs (the data's features are all int32).

  packed: with seqio's segment ids and positions of both sides (docs/PACKING.md).
  """
  sharding = partitioning.batch_sharding(mesh)
  shapes = {'encoder_input_tokens': (batch_size, lengths['inputs']),   # [batch, inputs_len]
            'decoder_target_tokens': (batch_size, lengths['targets']),  # [batch, targets_len]
            'decoder_input_tokens': (batch_size, lengths['targets']),
            'decoder_loss_weights': (batch_size, lengths['targets']),
            'task_ids': (batch_size,)}                                   # [batch]
  if packed:
    for side, feature in (('encoder', 'inputs'), ('decoder', 'targets')):
      for kind in ('segment_ids', 'positions'):
        shapes[f'{side}_{kind}'] = (batch_size, lengths[feature])
  return {k: jax.ShapeDtypeStruct(v, jnp.int32, sharding=sharding) for k, v in shapes.items()}


class TrainStepBuilder:
  """Makes the train step from a plan and compiles it in `pool`.

  If the real batch differs from the one described by the feature lengths, the
  first step simply compiles again.
  """

  def __init__(self, pool: concurrent.futures.Executor, *, freeze: str, batch_size: int,
               lengths: Mapping[str, int], rng: jax.Array, packed: bool = False):
    self._pool = pool
    self._freeze = freeze
    self._batch_size = batch_size
    self._lengths = dict(lengths)
    self._rng = rng
    self._packed = packed
    self.step_fn = None
    self.future: Optional[concurrent.futures.Future] = None
    self.seconds: Optional[float] = None  # how long the compilation took

  def on_plan(self, plan) -> None:
    self.step_fn = train_state.make_train_step(plan.model, plan.optimizer, plan.mesh,
                                               plan.shardings, freeze=self._freeze,
                                               schedule=plan.schedule)
    if hasattr(self.step_fn, 'jitted'):
      self.future = self._pool.submit(self._compile, plan)

  def _compile(self, plan) -> None:
    t0 = time.perf_counter()
    state = train_state.abstract_with_shardings(plan.abstract_state, plan.shardings)
    batch = batch_spec(plan.mesh, self._batch_size, self._lengths, self._packed)
    self.step_fn.jitted.lower(state, batch, self._rng).compile()
    self.seconds = time.perf_counter() - t0

  def pending(self) -> list:
    """The compile future, if one is running (to wait for on a set-up error)."""
    return [self.future] if self.future is not None else []

  def result(self) -> Any:
    """The train step, once its ahead-of-time compilation has finished (or failed)."""
    if self.future is not None:
      try:
        self.future.result()
      except Exception as e:  # pylint: disable=broad-except
        log(f'note: ahead-of-time compilation of the train step failed ({e}); '
            'it compiles on the first step instead')
    return self.step_fn
