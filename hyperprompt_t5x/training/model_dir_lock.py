"""One writer per MODEL_DIR: a lock file naming the holder (host, pid, start time).

`train` holds `MODEL_DIR/writer.lock` from before its first write to its exit.
A second `train` on the same MODEL_DIR fails at once with `ModelDirLockedError`
naming the holder. A lock whose holder is gone does not block:

* same host: the holder's pid is not running, or runs a different process
  (its start time in /proc differs: the pid was reused);
* another host: the holder refreshes the file's mtime every `HEARTBEAT_SECONDS`
  from a background thread; a lock not refreshed for `STALE_SECONDS` is stale.

A stale lock is taken over with a note naming the dead holder. Multi-host: only
process 0 takes the lock (it holds it for the whole run); the other processes
learn the outcome from it, so every process fails or proceeds together.
MODEL_DIRs on remote filesystems (`gs://...`) are not locked (no atomic
create-if-absent through the local filesystem); the run says so.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import threading
import time
from typing import Optional

LOCK_FILE = 'writer.lock'
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 600.0


class ModelDirLockedError(RuntimeError):
  """Another live process writes this MODEL_DIR."""


def _process_start_ticks(pid: int) -> Optional[int]:
  """The process's start time (clock ticks since boot) from /proc, or None."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      # Field 22; the command name (field 2) may hold spaces, so split after ')'.
      return int(f.read().rsplit(')', 1)[1].split()[19])
  except (OSError, IndexError, ValueError):
    return None


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, owned by another user
    return True
  return True


def describe(holder: dict) -> str:
  started = holder.get('started')
  when = (datetime.datetime.fromtimestamp(started, datetime.timezone.utc)
          .strftime('%Y-%m-%d %H:%M:%S UTC') if isinstance(started, (int, float)) else '?')
  return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {when}"


def stale_reason(holder: dict, lock_age_seconds: float) -> Optional[str]:
  """Why the holder of a lock is gone, or None if it may still be running."""
  host, pid = holder.get('host'), holder.get('pid')
  if not isinstance(pid, int) or not host:
    return 'the lock file is unreadable'
  if host == socket.gethostname():
    if not _pid_alive(pid):
      return f'process {pid} is not running'
    ticks = holder.get('start_ticks')
    if ticks is not None and _process_start_ticks(pid) not in (None, ticks):
      return f'pid {pid} now belongs to another process'
    return None
  if lock_age_seconds > STALE_SECONDS:
    return f'its lock was last refreshed {lock_age_seconds:.0f} s ago'
  return None


class ModelDirLock:
  """`with ModelDirLock(model_dir):` holds MODEL_DIR for this process (see module doc)."""

  def __init__(self, model_dir: str, log=print):
    self.model_dir = str(model_dir)
    self.path = os.path.join(self.model_dir, LOCK_FILE)
    self._log = log
    self._held = False
    self._acquired = False
    self._created_dir = False
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None
    self.me = {'host': socket.gethostname(), 'pid': os.getpid(), 'started': time.time(),
               'start_ticks': _process_start_ticks(os.getpid())}

  def acquire(self) -> None:
    """Takes the lock or raises ModelDirLockedError naming the live holder."""
    self._acquired = True
    if '://' in self.model_dir:
      self._log(f'note: MODEL_DIR {self.model_dir} is not locked against a second writer '
                '(remote filesystem)')
      return
    if not os.path.isdir(self.model_dir):
      os.makedirs(self.model_dir)
      self._created_dir = True
    for _ in range(3):  # a racing taker-over may remove the file between our steps
      if self._create():
        self._held = True
        self._thread = threading.Thread(target=self._heartbeat, daemon=True,
                                        name='model-dir-lock-heartbeat')
        self._thread.start()
        return
      holder, age = self._read()
      if holder is None:
        continue
      reason = stale_reason(holder, age)
      if reason is None:
        self._release_dir()
        self._acquired = False
        raise ModelDirLockedError(
            f'MODEL_DIR {self.model_dir} is being written by another run ({describe(holder)}); '
            f'wait for it to finish or stop it, or use another MODEL_DIR. Lock file: {self.path}')
      self._log(f'note: taking over the lock of a run that is gone ({describe(holder)}: '
                f'{reason})')
      try:
        os.remove(self.path)
      except FileNotFoundError:
        pass
    raise ModelDirLockedError(f'could not take the lock {self.path}: other runs keep taking it')

  def _create(self) -> bool:
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, 'w') as f:
      json.dump(self.me, f)
    return True

  def _read(self):
    """(holder dict, seconds since its last refresh), or (None, 0) if it vanished."""
    try:
      with open(self.path) as f:
        text = f.read()
      age = time.time() - os.stat(self.path).st_mtime
    except FileNotFoundError:
      return None, 0.0
    try:
      holder = json.loads(text)
    except json.JSONDecodeError:
      holder = {}  # a holder killed while writing it: stale (no pid)
    return (holder if isinstance(holder, dict) else {}), age

  def _heartbeat(self) -> None:
    while not self._stop.wait(HEARTBEAT_SECONDS):
      try:
        os.utime(self.path)
      except OSError:
        pass

  def release(self) -> None:
    """Removes the lock if this process holds it (and MODEL_DIR if the lock made it empty)."""
    self._stop.set()
    if self._held:
      holder, _ = self._read()
      if holder is not None and holder.get('pid') == self.me['pid'] and (
          holder.get('host') == self.me['host']):
        os.remove(self.path)
      self._held = False
    self._release_dir()

  def _release_dir(self) -> None:
    if self._created_dir:
      try:
        os.rmdir(self.model_dir)  # only if nothing else was written
      except OSError:
        pass
      self._created_dir = False

  def __enter__(self):
    if not self._acquired:  # `hold()` returns it acquired
      self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()


def hold(model_dir: str, log=print) -> ModelDirLock:
  """Process 0 takes the lock; every process raises if it could not (multi-host safe)."""
  import jax  # pylint: disable=g-import-not-at-top
  lock = ModelDirLock(model_dir, log)
  error = ''
  if jax.process_index() == 0:
    try:
      lock.acquire()
    except ModelDirLockedError as e:
      error = str(e)
  else:
    lock._acquired = True  # process 0 holds it for all; `with` must not take it again  # pylint: disable=protected-access
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    ok = int(multihost_utils.broadcast_one_to_all(np.int32(0 if error else 1)))
    if not ok and not error:
      error = f'MODEL_DIR {model_dir} is being written by another run (see process 0)'
  if error:
    raise ModelDirLockedError(error)
  return lock
