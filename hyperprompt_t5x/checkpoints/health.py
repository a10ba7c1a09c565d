"""Is a checkpoint whole? File-size manifests, damaged checkpoints set aside, failed saves.

* After orbax has committed `checkpoint_<step>/`, `write_manifest` records the
  size of every file in it (`file_sizes.json`). `damage(step_dir)` compares the
  files on disk with it and names a missing or truncated one. A checkpoint
  without the manifest (written before it existed, or killed between orbax's
  commit and the manifest) is judged by restoring it.
* `move_aside(step_dir)` moves an unusable checkpoint to `MODEL_DIR/damaged/`;
  nothing here deletes a checkpoint.
* `failure_reason(exc)`: one short phrase for a failed write ("no space left on
  device", "file too large", ...) out of orbax's / TensorStore's nested errors.

Local filesystems only: on remote ones (gs://) the manifest is skipped and a
damaged checkpoint shows up when it is restored.
"""
from __future__ import annotations

import errno
import json
import os
import pathlib
from typing import Optional

MANIFEST = 'file_sizes.json'
DAMAGED_DIR = 'damaged'

_WRITE_ERRORS = {errno.ENOSPC: 'no space left on device', errno.EDQUOT: 'disk quota exceeded',
                 errno.EFBIG: 'file too large (a file-size limit was hit)',
                 errno.EROFS: 'read-only filesystem', errno.EACCES: 'permission denied'}


def _is_local(path: pathlib.Path) -> bool:
  return '://' not in str(path)


def write_manifest(step_dir: pathlib.Path) -> None:
  """Records every file's size in step_dir/file_sizes.json (atomically)."""
  step_dir = pathlib.Path(step_dir)
  if not _is_local(step_dir):
    return
  sizes = {str(p.relative_to(step_dir)): p.stat().st_size
           for p in sorted(step_dir.rglob('*')) if p.is_file() and p.name != MANIFEST}
  tmp = step_dir / (MANIFEST + '.tmp')
  tmp.write_text(json.dumps(sizes, indent=0, sort_keys=True))
  os.replace(tmp, step_dir / MANIFEST)


def damage(step_dir: pathlib.Path) -> Optional[str]:
  """Why checkpoint `step_dir` is unusable by its manifest (missing / truncated file), or None."""
  step_dir = pathlib.Path(step_dir)
  if not _is_local(step_dir):
    return None
  if not step_dir.is_dir():
    return 'its directory is missing'
  path = step_dir / MANIFEST
  if not path.exists():
    return None
  try:
    sizes = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    return f'its {MANIFEST} is unreadable ({e})'
  for name, size in sorted(sizes.items()):
    file = step_dir / name
    if not file.is_file():
      return f'file {name} is missing'
    got = file.stat().st_size
    if got < size:
      return f'file {name} is truncated ({got} of {size} bytes)'
    if got != size:
      return f'file {name} has {got} bytes, {size} were written'
  return None


def move_aside(step_dir: pathlib.Path) -> pathlib.Path:
  """Moves step_dir to MODEL_DIR/damaged/<name>[.n]; returns where it went."""
  step_dir = pathlib.Path(step_dir)
  root = step_dir.parent / DAMAGED_DIR
  root.mkdir(exist_ok=True)
  target = root / step_dir.name
  n = 1
  while target.exists():
    target = root / f'{step_dir.name}.{n}'
    n += 1
  os.replace(step_dir, target)
  return target


def failure_reason(exc: BaseException) -> str:
  """A short phrase for why a write failed, from the exception and its causes."""
  seen = exc
  while seen is not None:
    if isinstance(seen, OSError) and seen.errno in _WRITE_ERRORS:
      return _WRITE_ERRORS[seen.errno]
    text = str(seen)
    for code, phrase in _WRITE_ERRORS.items():
      if os.strerror(code) in text:
        return phrase
    seen = seen.__cause__ or seen.__context__
  return first_line(exc)


def first_line(exc: BaseException, limit: int = 300) -> str:
  """`Type: first line of the message`, at most `limit` characters."""
  text = (str(exc).strip().splitlines() or [''])[0]
  text = f'{type(exc).__name__}: {text}' if text else type(exc).__name__
  return text if len(text) <= limit else text[:limit - 3] + '...'
