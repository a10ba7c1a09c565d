"""Runs a module as `python -m MODULE ARGS...` and saves what step 0's prompt-scale
calibration returned on this process (tests of multi-process runs).

    python tests/calibration_probe.py OUT.npz t5x.train --gin_file=...
    python tests/calibration_probe.py OUT.npz hyperprompt_t5x.cli.commands train ...

OUT.npz: the calibrated task-conditioning parameters ('/'-joined names), as this
process holds them (replicated: its first addressable shard is the whole array).
"""
import runpy
import sys

import numpy as np

from hyperprompt_t5x.training import prompt_scale

CONDITIONING_KEY = 'task_conditioning'


def _flat(tree, prefix=''):
  for key, value in tree.items():
    name = f'{prefix}{key}'
    if hasattr(value, 'items'):
      yield from _flat(value, name + '/')
    else:
      yield name, value


def _host_copy(array) -> np.ndarray:
  shard = array.addressable_data(0) if hasattr(array, 'addressable_data') else array
  host = np.asarray(shard)
  assert host.shape == tuple(array.shape), f'not replicated: {array.shape} vs {host.shape}'
  return host


def main() -> None:
  out, module, *args = sys.argv[1:]
  calibrate = prompt_scale.calibrate_first_batch

  def recording(*a, **k):
    params, message = calibrate(*a, **k)
    np.savez(out, **{name: _host_copy(v) for name, v in _flat(params[CONDITIONING_KEY])})
    return params, message

  prompt_scale.calibrate_first_batch = recording
  sys.argv = [module, *args]
  runpy.run_module(module, run_name='__main__', alter_sys=True)


if __name__ == '__main__':
  main()
