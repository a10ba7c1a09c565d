"""One writer per MODEL_DIR: a live holder blocks with its name, a dead one does not."""
import json
import os
import socket
import subprocess
import time

import pytest

from hyperprompt_t5x.training import model_dir_lock
from hyperprompt_t5x.training.model_dir_lock import LOCK_FILE, ModelDirLock, ModelDirLockedError


def _write_lock(model_dir, **holder):
  model_dir.mkdir(exist_ok=True)
  (model_dir / LOCK_FILE).write_text(json.dumps(holder))
  return model_dir / LOCK_FILE


def _dead_pid() -> int:
  proc = subprocess.Popen(['true'])
  proc.wait()
  return proc.pid


def test_lock_names_host_pid_and_is_released(tmp_path):
  model_dir = tmp_path / 'run'
  with ModelDirLock(str(model_dir)) as lock:
    holder = json.loads((model_dir / LOCK_FILE).read_text())
    assert holder['host'] == socket.gethostname() and holder['pid'] == os.getpid()
    assert abs(holder['started'] - time.time()) < 60
    with pytest.raises(ModelDirLockedError) as e:
      ModelDirLock(str(model_dir)).acquire()  # a second writer while the first is alive
    message = str(e.value)
    assert f'host {socket.gethostname()}, pid {os.getpid()}, started ' in message
    assert str(model_dir) in message and lock.path in message
  assert not (model_dir / LOCK_FILE).exists()
  assert not model_dir.exists()  # made for the lock, left empty: removed again


def test_live_process_on_this_host_blocks(tmp_path):
  sleeper = subprocess.Popen(['sleep', '60'])
  try:
    path = _write_lock(tmp_path, host=socket.gethostname(), pid=sleeper.pid,
                       started=time.time(),
                       start_ticks=model_dir_lock._process_start_ticks(sleeper.pid))
    with pytest.raises(ModelDirLockedError, match=f'pid {sleeper.pid}'):
      ModelDirLock(str(tmp_path)).acquire()
    assert path.exists() and json.loads(path.read_text())['pid'] == sleeper.pid
  finally:
    sleeper.kill()
    sleeper.wait()


@pytest.mark.parametrize('holder', [
    dict(host=socket.gethostname(), pid=None, started=0.0),  # pid of a finished process
    dict(host=socket.gethostname(), pid=os.getpid(), started=0.0, start_ticks=-1),  # reused
])
def test_dead_holder_on_this_host_does_not_block(tmp_path, holder):
  if holder['pid'] is None:
    holder['pid'] = _dead_pid()
  _write_lock(tmp_path, **holder)
  notes = []
  with ModelDirLock(str(tmp_path), log=notes.append):
    assert json.loads((tmp_path / LOCK_FILE).read_text())['pid'] == os.getpid()
  assert len(notes) == 1 and 'taking over' in notes[0] and f"pid {holder['pid']}" in notes[0]


def test_other_host_blocks_until_its_heartbeat_is_stale(tmp_path):
  path = _write_lock(tmp_path, host='tpu-vm-7', pid=1234, started=time.time())
  with pytest.raises(ModelDirLockedError, match='host tpu-vm-7, pid 1234'):
    ModelDirLock(str(tmp_path)).acquire()
  old = time.time() - model_dir_lock.STALE_SECONDS - 5
  os.utime(path, (old, old))
  notes = []
  with ModelDirLock(str(tmp_path), log=notes.append):
    pass
  assert 'last refreshed' in notes[0]


def test_half_written_lock_file_is_stale(tmp_path):
  (tmp_path / LOCK_FILE).write_text('{"host": "a", "pi')  # holder killed while writing it
  with ModelDirLock(str(tmp_path), log=lambda _: None):
    assert json.loads((tmp_path / LOCK_FILE).read_text())['pid'] == os.getpid()


def test_release_leaves_another_holders_lock(tmp_path):
  lock = ModelDirLock(str(tmp_path))
  lock.acquire()
  _write_lock(tmp_path, host='elsewhere', pid=1, started=0.0)  # someone took it over
  lock.release()
  assert json.loads((tmp_path / LOCK_FILE).read_text())['host'] == 'elsewhere'
