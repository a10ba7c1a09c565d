"""Preemption: SIGTERM / SIGINT stop the train loop after the current step, with a checkpoint.

Cloud TPU VMs and spot GPUs announce a preemption with SIGTERM; Ctrl-C is SIGINT.
Inside `StopRequest` the first of them only sets a flag, which the loop reads
after each step (`requested()`): it saves a checkpoint of that step (with the
data position) and raises `TrainingInterrupted`; the CLI prints its one line
and exits with 128 + the signal number (130 for SIGINT, 143 for SIGTERM).

The handler then puts back the default action, so a second signal ends the
process at once. That cannot damage the previous checkpoint: orbax writes a
checkpoint in a temporary folder and commits it with one rename.

Multi-host: each process may get the signal at a different step, so
`requested()` combines the flags of all processes (a max over an all-gather,
one small host sync per step); every process stops after the same step.
"""
from __future__ import annotations

import signal
import threading
from typing import Optional

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(Exception):
  """The run stopped on a signal after saving `checkpoint_<step>`."""

  def __init__(self, signum: int, step: int):
    self.signum = signum
    self.step = step
    self.exit_code = 128 + signum
    super().__init__(f'interrupted at step {step}; checkpoint saved; '
                     'rerun the same command to resume')


class StopRequest:
  """`with StopRequest() as stop:` turns SIGTERM / SIGINT into `stop.requested()`.

  Outside the main thread (where handlers cannot be set) it never requests a stop.
  """

  def __init__(self, signals=SIGNALS):
    self._signals = tuple(signals)
    self._previous = {}
    self.signum: Optional[int] = None

  def _handle(self, signum, frame) -> None:
    del frame
    self.signum = signum
    for s in self._signals:  # a second signal: the default action, at once
      signal.signal(s, signal.SIG_DFL)

  def __enter__(self) -> 'StopRequest':
    if threading.current_thread() is threading.main_thread():
      for s in self._signals:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous.clear()

  def requested(self) -> int:
    """The signal to stop on (agreed by all processes), or 0 to go on."""
    import jax  # pylint: disable=g-import-not-at-top
    local = int(self.signum or 0)
    if jax.process_count() == 1:
      return local
    import numpy as np  # pylint: disable=g-import-not-at-top
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return int(np.max(multihost_utils.process_allgather(np.int32(local))))
