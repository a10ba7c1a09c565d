"""What a training run survives: preemption signals, kills at any moment (the quick version
of bench/kill_harness.py), damaged checkpoints, a second writer, a failed save, bad task ids.

Runs use gin/demo.gin's tiny model through the CLI, in this process where a signal or
failure can be survived here, in subprocesses where the process must die.
"""
import json
import os
import pathlib
import resource
import shutil
import signal
import socket
import subprocess
import threading
import time

import numpy as np
import pytest

from hyperprompt_t5x.cli import commands
from hyperprompt_t5x.training import model_dir_lock
from test_trainer import copy_of, demo_args, snapshot  # tests/ is on sys.path under pytest
from bench import kill_harness  # noqa: E402  (test_trainer put the repository on sys.path)

pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning')


@pytest.fixture(scope='module', autouse=True)
def _shared_compilation_cache(compilation_cache):
  return compilation_cache


def _logged_steps(model_dir) -> int:
  records = kill_harness.metrics_by_kind(model_dir).get('train', []) if (
      pathlib.Path(model_dir) / 'metrics.jsonl').exists() else []
  return max((s for s, _ in records), default=0)


def _signal_self_after(model_dir, step: int, signum: int, done: threading.Event):
  """Sends `signum` to this process once metrics.jsonl has logged `step` (unless `done`)."""
  def watch():
    while _logged_steps(model_dir) < step:
      if done.wait(0.005):
        return
    os.kill(os.getpid(), signum)
  thread = threading.Thread(target=watch, daemon=True)
  thread.start()
  return thread


def _checkpoints(model_dir) -> dict:
  """checkpoint_<step> -> its files' digests (committed checkpoints only)."""
  return {p.name: snapshot(p) for p in pathlib.Path(model_dir).glob('checkpoint_*')
          if p.name.split('_', 1)[1].isdigit()}


def test_signals_and_kills_resume_to_identical_params(tmp_path, compilation_cache, capsys):
  steps, save = 12, 6
  reference = tmp_path / 'reference'
  assert commands.main(demo_args(reference, steps=steps, save=save)) == 0
  model_dir = tmp_path / 'interrupted'
  args = demo_args(model_dir, steps=steps, save=save)
  capsys.readouterr()

  # 1. SIGINT (Ctrl-C) after step 2: the step in progress finishes and is saved (with its
  #    data position) although it is no save step; one line, exit status 130.
  done = threading.Event()
  watcher = _signal_self_after(model_dir, 2, signal.SIGINT, done)
  try:
    code = commands.main(args)
  finally:
    done.set()
    watcher.join()
  assert code == 130
  err = capsys.readouterr().err
  stopped = sorted(int(p.name.split('_')[1]) for p in model_dir.glob('checkpoint_*'))[-1]
  assert 2 <= stopped < save, stopped  # an off-period checkpoint
  assert err.strip().splitlines()[-1] == (
      f'interrupted at step {stopped}; checkpoint saved; rerun the same command to resume')
  assert 'Traceback' not in err
  assert not (model_dir / model_dir_lock.LOCK_FILE).exists()

  env = kill_harness.subprocess_env(compilation_cache)
  # 2. SIGKILL while a periodic checkpoint is being written.
  attempt = kill_harness.Attempt(args, model_dir, env)
  assert attempt.wait_until(attempt.writing_checkpoint, 600), attempt.output()
  attempt.signal(signal.SIGKILL)
  assert attempt.finish() == -signal.SIGKILL
  assert attempt.phase() == 'checkpoint write', attempt.output()
  # 3. SIGTERM (preemption), then a second SIGTERM during the checkpoint it writes:
  #    the process ends at once; the checkpoints already there are untouched.
  before = _checkpoints(model_dir)
  attempt = kill_harness.Attempt(args, model_dir, env)
  first = stopped + 1
  assert attempt.wait_until(lambda: (attempt.last_step() or 0) >= first, 600), attempt.output()
  attempt.signal(signal.SIGTERM)
  assert attempt.wait_until(attempt.writing_checkpoint, 600), attempt.output()
  attempt.signal(signal.SIGTERM)
  assert attempt.finish() == -signal.SIGTERM, attempt.output()
  assert attempt.phase() == 'checkpoint write'
  assert {k: v for k, v in _checkpoints(model_dir).items() if k in before} == before

  # 4. The same command again runs to the end: same params, metrics, as never interrupted.
  assert commands.main(args) == 0
  assert 'Starting at step 0 from' not in capsys.readouterr().out
  comparison = kill_harness.compare_runs(reference, model_dir, steps)
  assert comparison['params_identical'] and comparison['params_compared'] > 20
  assert comparison['problems'] == []
  assert comparison['metric_steps'] == {'train': steps}


# ----------------------------------------------------------------------------
# Damaged checkpoints, other models, a second writer, a failed save.
# ----------------------------------------------------------------------------


@pytest.fixture(scope='module')
def two_checkpoints(tmp_path_factory):
  """MODEL_DIR with checkpoint_2 and checkpoint_4 of the demo model."""
  model_dir = tmp_path_factory.mktemp('two') / 'run'
  assert commands.main(demo_args(model_dir, steps=4, save=2)) == 0
  return model_dir


def _largest_state_file(checkpoint):
  return max((p for p in (checkpoint / 'state').rglob('*') if p.is_file()),
             key=lambda p: p.stat().st_size)


def _truncate(checkpoint) -> str:
  victim = _largest_state_file(checkpoint)
  size = victim.stat().st_size
  victim.write_bytes(victim.read_bytes()[:size // 3])
  return (f'file {victim.relative_to(checkpoint)} is truncated ({size // 3} of {size} '
          'bytes)')


def _remove_state(checkpoint) -> str:
  shutil.rmtree(checkpoint / 'state')
  return 'file state/'


@pytest.mark.parametrize('damage', [_truncate, _remove_state])
def test_damaged_newest_checkpoint_is_moved_aside_and_training_resumes(
    two_checkpoints, tmp_path, capsys, damage):
  model_dir = copy_of(two_checkpoints, tmp_path)
  why = damage(model_dir / 'checkpoint_4')
  damaged = snapshot(model_dir / 'checkpoint_4')
  capsys.readouterr()
  assert commands.main(demo_args(model_dir, steps=4, save=2)) == 0
  out = capsys.readouterr().out
  assert f'checkpoint {model_dir / "checkpoint_4"} is damaged: {why}' in out, out
  assert f'Moved it to {model_dir / "damaged" / "checkpoint_4"}' in out
  assert f'Starting at step 2 from {model_dir}/checkpoint_2' in out
  assert snapshot(model_dir / 'damaged' / 'checkpoint_4') == damaged  # kept, not deleted
  assert (model_dir / 'checkpoint_4' / 'state').is_dir()  # written again


@pytest.mark.parametrize('command', ['eval', 'infer'])
def test_eval_and_infer_on_a_damaged_checkpoint(two_checkpoints, tmp_path, capsys, command):
  model_dir = copy_of(two_checkpoints, tmp_path)
  why = _truncate(model_dir / 'checkpoint_4')
  before = snapshot(model_dir)
  assert commands.main([command, '--gin_file=demo.gin', f'--gin.MODEL_DIR={model_dir}',
                   '--gin.EVAL_MAX_EXAMPLES=4']) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == [f'error: checkpoint {model_dir / "checkpoint_4"} is damaged: {why}'], err
  assert snapshot(model_dir) == before


@pytest.mark.parametrize('command', ['eval', 'infer'])
@pytest.mark.parametrize('binding,field', [
    ('T5Config.emb_dim = 32', 'emb_dim'), ("T5Config.method = 'share'", 'method'),
    ('T5Config.vocab_size = 512', 'vocab_size')])
def test_eval_and_infer_refuse_another_models_checkpoint(two_checkpoints, capsys, command,
                                                         binding, field):
  before = snapshot(two_checkpoints)
  assert commands.main([command, '--gin_file=demo.gin', f'--gin.MODEL_DIR={two_checkpoints}',
                   f'--gin_bindings={binding}']) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and 'different model' in err[0] and field in err[0], err
  assert snapshot(two_checkpoints) == before


def test_second_writer_is_refused_and_a_dead_holder_is_not(two_checkpoints, tmp_path, capsys):
  model_dir = copy_of(two_checkpoints, tmp_path)
  holder = subprocess.Popen(['sleep', '600'])  # a live process on this host holds the lock
  try:
    (model_dir / model_dir_lock.LOCK_FILE).write_text(json.dumps(
        {'host': socket.gethostname(), 'pid': holder.pid, 'started': time.time(),
         'start_ticks': model_dir_lock._process_start_ticks(holder.pid)}))
    before = snapshot(model_dir)
    capsys.readouterr()
    assert commands.main(demo_args(model_dir, steps=6, save=2)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f'host {socket.gethostname()}, pid {holder.pid}, started' in err[0]
    assert 'being written by another run' in err[0]
    assert snapshot(model_dir) == before
  finally:
    holder.kill()
    holder.wait()
  assert commands.main(demo_args(model_dir, steps=6, save=2)) == 0  # its holder is gone
  out = capsys.readouterr().out
  assert f'taking over the lock of a run that is gone (host {socket.gethostname()}, ' \
         f'pid {holder.pid}' in out
  assert (model_dir / 'checkpoint_6').is_dir() and not (model_dir / 'writer.lock').exists()


def test_failed_save_stops_with_one_line_and_the_next_run_resumes(two_checkpoints, tmp_path,
                                                                 capsys):
  """Saving checkpoint_6 fails (a file-size limit makes the write fail as a full disk
  would); checkpoint_4 stays intact and the same command then resumes from it."""
  model_dir = copy_of(two_checkpoints, tmp_path)
  before = _checkpoints(model_dir)
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, hard))
  try:
    code = commands.main(demo_args(model_dir, steps=6, save=2))
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, previous)
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and err == [
      f'error: could not write checkpoint {model_dir / "checkpoint_6"}: file too large '
      f'(a file-size limit was hit); the previous checkpoint {model_dir / "checkpoint_4"} is '
      'intact. Free space (or fix the cause) and rerun the same command to resume.'], err
  assert _checkpoints(model_dir) == before
  assert not list(model_dir.glob('*orbax-checkpoint-tmp*'))
  assert commands.main(demo_args(model_dir, steps=6, save=2)) == 0
  assert f'Starting at step 4 from {model_dir}/checkpoint_4' in capsys.readouterr().out


def test_task_id_outside_the_mixture_is_refused_before_decoding(two_checkpoints):
  from hyperprompt_t5x.evaluation import evaluator
  from hyperprompt_t5x import gin_config
  from hyperprompt_t5x.run import run_setup
  gin_config.parse(['demo.gin'], macros=[('MODEL_DIR', str(two_checkpoints))])
  run = run_setup.build_run(model_dir=str(two_checkpoints), config=gin_config.model_config(),
                            mixture_or_task_name='hyperprompt_demo',
                            task_feature_lengths={'inputs': 8, 'targets': 2},
                            settings=run_setup.OptimizerSettings(optimizer='adamw'))
  decoder = evaluator.Decoder(run, 4, 2)
  tokens = np.full((2, 8), 5, np.int32)
  with pytest.raises(ValueError, match=r'task_ids out of range \[0, num_tasks=3\): bad ids \[3\]'):
    decoder(run.state.params, tokens, np.array([0, 3]))
