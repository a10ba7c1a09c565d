"""Kill-at-any-moment harness: SIGKILL a training run again and again; it must resume exactly.

  python bench/kill_harness.py --kills 20 --steps 40 --save_period 2 --eval_period 10

1. An uninterrupted reference run of the offline demo (gin/demo.gin, tiny model).
2. The same command in a fresh MODEL_DIR, started again after every kill. Each
   attempt is SIGKILLed at a random moment of a random kind: during start-up
   (a random delay), after a random training step (plus up to 0.3 s), or as a
   checkpoint write begins (orbax's temporary folder appears, plus up to 20 ms).
   The phase the process was really in is read afterwards from its output and
   MODEL_DIR: start-up, training (or eval), checkpoint write.
3. A last attempt runs to the end. Then the final parameters must be
   bit-identical to the reference's, metrics.jsonl must hold every step once
   with the reference's losses, best.json must equal the reference's, and no
   lock or half-written checkpoint may be left.

Prints one line per kill, a summary, and the figures as one JSON line
(`--json_out` writes them to a file). The model, data and compiled programs are
the demo's; compilations are shared through JAX's persistent cache
(`--cache_dir`). Imports neither JAX nor seqio itself (the runs are subprocesses;
the final comparison reads the checkpoints with hyperprompt_t5x.checkpoints.pretrained).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, List, Optional
from hyperprompt_t5x.checkpoints import pretrained  # noqa: E402

TMP_MARK = '.orbax-checkpoint-tmp'
FAST_XLA = ('--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true '
            '--xla_cpu_use_fusion_emitters=false')  # fast XLA:CPU compiles


def demo_args(model_dir, *extra, steps: int = 2, save: int = 2, eval_period=None) -> list:
  """`train` on the demo's model and data, logging every step (the CLI's argv)."""
  return ['train', '--gin_file=demo.gin', f'--gin.MODEL_DIR={model_dir}',
          f'--gin.TRAIN_STEPS={steps}', f'--gin.SAVE_PERIOD={save}',
          f'--gin.EVAL_PERIOD={eval_period}', '--gin.LOG_PERIOD=1', '--gin.XLA_FLAGS=None',
          *extra]


def subprocess_env(cache_dir) -> dict:
  """The environment of a run: shared compilation cache, fast CPU compiles, quiet TF."""
  return dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache_dir),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0', XLA_FLAGS=FAST_XLA,
              TF_CPP_MIN_LOG_LEVEL='3')


class Attempt:
  """One `hyperprompt_t5x.cli.commands` process with its output collected line by line."""

  def __init__(self, args: list, model_dir, env: dict):
    self.model_dir = pathlib.Path(model_dir)
    self.started = time.monotonic()
    self.wall_start = time.time()
    self.lines: List[str] = []
    self.proc = subprocess.Popen([sys.executable, '-m', 'hyperprompt_t5x.cli.commands', *args],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 env=env)
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self) -> None:
    for line in self.proc.stdout:
      self.lines.append(line.rstrip('\n'))

  def writing_checkpoint(self) -> bool:
    """Whether orbax's temporary folder of a save begun by this process is there."""
    try:
      names = [n for n in os.listdir(self.model_dir) if TMP_MARK in n]
      return any(os.stat(self.model_dir / n).st_ctime >= self.wall_start for n in names)
    except FileNotFoundError:
      return False

  def last_step(self) -> Optional[int]:
    for line in reversed(self.lines):
      if line.startswith('step ') and '/' in line:
        return int(line.split()[1].split('/')[0])
    return None

  def resumed_from(self) -> Optional[int]:
    """The step of the 'Starting at step N' line, if printed yet."""
    for line in self.lines:
      if line.startswith('Starting at step'):
        return int(line.split()[3])
    return None

  def started_training(self) -> bool:
    return any(l.startswith('Starting at step') for l in self.lines)

  def wait_until(self, condition: Callable[[], bool], timeout: float,
                 poll: float = 0.001) -> bool:
    """True once `condition()` holds; False if the process ended or time ran out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      if condition():
        return True
      if self.proc.poll() is not None:
        return condition()
      time.sleep(poll)
    return False

  def signal(self, signum: int) -> None:
    if self.proc.poll() is None:
      self.proc.send_signal(signum)

  def finish(self, timeout: float = 300) -> int:
    rc = self.proc.wait(timeout=timeout)
    self._reader.join(timeout=10)
    return rc

  def phase(self) -> str:
    """Where the (dead) process was: start-up, checkpoint write, training."""
    if not self.started_training():
      return 'start-up'
    if self.writing_checkpoint():
      return 'checkpoint write'
    return 'training'

  def output(self, last: int = 30) -> str:
    return '\n'.join(self.lines[-last:])


def kill_once(attempt: Attempt, kind: str, rng: random.Random, total_steps: int,
              timeout: float = 600) -> bool:
  """SIGKILLs `attempt` at a moment of `kind`; False if it finished first."""
  if kind == 'start-up':
    attempt.wait_until(lambda: False, rng.uniform(0.5, 8.0))
  elif kind == 'step':  # a random step between where this attempt resumed and the end
    attempt.wait_until(attempt.started_training, timeout)
    start = attempt.resumed_from() or 0
    target = rng.randint(start + 1, max(start + 1, total_steps - 1))
    attempt.wait_until(lambda: (attempt.last_step() or 0) >= target, timeout)
    attempt.wait_until(lambda: False, rng.uniform(0.0, 0.3))
  elif kind == 'checkpoint write':
    attempt.wait_until(attempt.writing_checkpoint, timeout)
    attempt.wait_until(lambda: False, rng.uniform(0.0, 0.02))
  else:
    raise ValueError(f'unknown kill kind {kind!r}')
  if attempt.proc.poll() is not None:
    return False
  attempt.signal(signal.SIGKILL)
  attempt.finish()
  return True


# ----------------------------------------------------------------------------
# Comparing a killed-and-resumed MODEL_DIR with the reference.
# ----------------------------------------------------------------------------


def metrics_by_kind(model_dir) -> dict:
  """kind ('train' or an eval split) -> list of (step, record) in file order."""
  out = collections.defaultdict(list)
  path = pathlib.Path(model_dir) / 'metrics.jsonl'
  for line in path.read_text().splitlines():
    record = json.loads(line)
    kinds = sorted({k.split('/', 1)[0] for k in record if '/' in k})
    out['/'.join(kinds) or 'train'].append((record['step'], record))
  return dict(out)


def compare_runs(reference, resumed, step: int) -> dict:
  """Figures and problems of `resumed` against `reference` (both MODEL_DIRs at `step`)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  reference, resumed = pathlib.Path(reference), pathlib.Path(resumed)
  problems = []
  want = pretrained.flatten_params(pretrained.load_t5x_params(
      str(reference / f'checkpoint_{step}')))
  got = pretrained.flatten_params(pretrained.load_t5x_params(
      str(resumed / f'checkpoint_{step}')))
  differ = sorted(n for n in want if n not in got or not np.array_equal(
      np.asarray(got[n]), np.asarray(want[n])))
  if sorted(got) != sorted(want) or differ:
    problems.append(f'params differ from the reference: {differ[:5]}')
  ref_metrics, got_metrics = metrics_by_kind(reference), metrics_by_kind(resumed)
  for kind, records in got_metrics.items():
    steps = [s for s, _ in records]
    repeated = sorted({s for s in steps if steps.count(s) > 1})
    if repeated:
      problems.append(f'metrics.jsonl repeats {kind} steps {repeated}')
    want_steps = [s for s, _ in ref_metrics.get(kind, [])]
    if sorted(set(steps)) != want_steps:
      problems.append(f'metrics.jsonl {kind} steps {sorted(set(steps))} != {want_steps}')
  ref_loss = {s: r['loss'] for s, r in ref_metrics.get('train', [])}
  loss_differ = [s for s, r in got_metrics.get('train', []) if r['loss'] != ref_loss.get(s)]
  if loss_differ:
    problems.append(f'losses differ from the reference at steps {loss_differ[:5]}')
  for name in ('best.json',):
    if (reference / name).exists() and json.loads((reference / name).read_text()) != (
        json.loads((resumed / name).read_text()) if (resumed / name).exists() else None):
      problems.append(f'{name} differs from the reference')
  leftovers = [p.name for p in resumed.iterdir()
               if TMP_MARK in p.name or p.name in ('writer.lock', 'damaged')]
  if leftovers:
    problems.append(f'left behind: {leftovers}')
  return {'params_compared': len(want), 'params_identical': not differ and len(got) == len(want),
          'metric_steps': {k: len(v) for k, v in got_metrics.items()}, 'problems': problems}


# ----------------------------------------------------------------------------
# The script.
# ----------------------------------------------------------------------------


def run_harness(work: pathlib.Path, *, kills: int, steps: int, save_period: int,
                eval_period, seed: int, cache_dir, log=print, gin=()) -> dict:
  """`gin`: extra bindings for both runs, e.g. ('PACK=True',)."""
  env = subprocess_env(cache_dir)
  rng = random.Random(seed)
  t0 = time.monotonic()
  reference = work / 'reference'
  extra = ['--gin.KEEP_CHECKPOINTS=None', *(f'--gin.{b}' for b in gin)]
  ref = Attempt(demo_args(reference, *extra, steps=steps, save=save_period,
                          eval_period=eval_period), reference, env)
  if ref.finish(timeout=1800) != 0:
    raise RuntimeError(f'the reference run failed:\n{ref.output()}')
  reference_seconds = time.monotonic() - t0
  log(f'reference run: {steps} steps in {reference_seconds:.0f} s')
  model_dir = work / 'killed'
  args = demo_args(model_dir, *extra, steps=steps, save=save_period, eval_period=eval_period)
  table, attempts = [], 0
  kinds = ['start-up', 'step', 'checkpoint write']
  while len(table) < kills:
    kind = rng.choice(kinds)
    attempt = Attempt(args, model_dir, env)
    attempts += 1
    if not kill_once(attempt, kind, rng, steps):
      rc = attempt.finish()
      if rc != 0:
        raise RuntimeError(f'attempt {attempts} failed (rc {rc}):\n{attempt.output()}')
      log(f'attempt {attempts}: finished before the kill ({kind}); starting over is not '
          'possible, stopping with the kills so far')
      break
    resumed_from = attempt.resumed_from()
    row = {'kill': len(table) + 1, 'aimed at': kind, 'phase': attempt.phase(),
           'resumed from step': resumed_from, 'last step logged': attempt.last_step(),
           'seconds alive': round(time.monotonic() - attempt.started, 1)}
    table.append(row)
    log(f"kill {row['kill']:>3}: aimed at {kind:<16} phase {row['phase']:<16} "
        f"resumed from {resumed_from}, last step {row['last step logged']}, "
        f"{row['seconds alive']} s alive")
  final = Attempt(args, model_dir, env)
  rc = final.finish(timeout=1800)
  if rc != 0:
    raise RuntimeError(f'the final run failed (rc {rc}):\n{final.output()}')
  comparison = compare_runs(reference, model_dir, steps)
  phases = collections.Counter(r['phase'] for r in table)
  figures = {'kills': len(table), 'phases': dict(phases), 'attempts': attempts + 1,
             'steps': steps, 'save_period': save_period, 'eval_period': eval_period,
             **comparison, 'seconds': round(time.monotonic() - t0, 1),
             'reference_seconds': round(reference_seconds, 1)}
  return figures


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--kills', type=int, default=20)
  parser.add_argument('--steps', type=int, default=40)
  parser.add_argument('--save_period', type=int, default=2)
  parser.add_argument('--eval_period', type=int, default=None,
                      help='evaluate every N steps (best.json compared too); default never')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--gin', action='append', default=[],
                      help="extra gin binding for every run, e.g. --gin PACK=True "
                           "--gin \"TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 2}\"")
  parser.add_argument('--work_dir', default=None, help='default: a fresh temporary folder')
  parser.add_argument('--cache_dir', default=None,
                      help='JAX persistent compilation cache (default: inside work_dir)')
  parser.add_argument('--json_out', default=None)
  args = parser.parse_args(argv)
  work = pathlib.Path(args.work_dir or tempfile.mkdtemp(prefix='kill_harness_'))
  work.mkdir(parents=True, exist_ok=True)
  figures = run_harness(work, kills=args.kills, steps=args.steps,
                        save_period=args.save_period, eval_period=args.eval_period,
                        seed=args.seed, cache_dir=args.cache_dir or work / 'xla_cache',
                        gin=args.gin)
  print(f"{figures['kills']} kills survived ({', '.join(f'{n} in {p}' for p, n in figures['phases'].items())}); "
        f"final params {'bit-identical' if figures['params_identical'] else 'DIFFERENT'} "
        f"({figures['params_compared']} arrays); problems: {figures['problems'] or 'none'}; "
        f"{figures['seconds']:.0f} s")
  print(json.dumps(figures, sort_keys=True))
  if args.json_out:
    pathlib.Path(args.json_out).write_text(json.dumps(figures, indent=2, sort_keys=True))
  return 0 if not figures['problems'] and figures['params_identical'] else 1


if __name__ == '__main__':
  sys.exit(main())
