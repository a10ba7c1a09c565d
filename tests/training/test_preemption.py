"""The first SIGTERM / SIGINT is a stop request; a second one gets the default action."""
import os
import signal

import pytest

from hyperprompt_t5x.training import preemption


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_first_signal_requests_a_stop_second_is_default(signum):
  before = {s: signal.getsignal(s) for s in preemption.SIGNALS}
  with preemption.StopRequest() as stop:
    assert stop.requested() == 0
    os.kill(os.getpid(), signum)  # delivered to this (main) thread before the next line
    assert stop.requested() == signum
    assert all(signal.getsignal(s) == signal.SIG_DFL for s in preemption.SIGNALS)
  assert {s: signal.getsignal(s) for s in preemption.SIGNALS} == before


def test_interrupted_exit_code_and_line():
  e = preemption.TrainingInterrupted(signal.SIGTERM, 17)
  assert e.exit_code == 143 and preemption.TrainingInterrupted(signal.SIGINT, 1).exit_code == 130
  assert str(e) == 'interrupted at step 17; checkpoint saved; rerun the same command to resume'
