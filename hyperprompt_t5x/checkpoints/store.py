"""The run's own checkpoints: orbax over MODEL_DIR, laid out as T5X's `checkpoint_<step>`.

Each checkpoint holds the TrainState (item `state`, sharded arrays, every
process writes its shards) and JSON metadata (item `extra`: data position,
config fingerprint, ...). One clear error for a checkpoint of another model
(tree_check.py) or a damaged one (health.py), one for a failed write.
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import time
from typing import Any, Mapping, Optional, Tuple

import flax
import jax
import orbax.checkpoint as ocp

from hyperprompt_t5x.checkpoints import health, step_dirs, tree_check
from hyperprompt_t5x.checkpoints.errors import (CheckpointCorruptError, CheckpointError,
                                                CheckpointSaveError)


class CheckpointStore:
  """Orbax checkpoints in MODEL_DIR as T5X lays them out: `checkpoint_<step>/`.

  Each checkpoint holds the TrainState (item `state`, sharded arrays, every
  process writes its shards) and JSON metadata (item `extra`: data position,
  config fingerprint, ...). `keep` = how many to keep (None: all);
  `create=False` (eval / infer) refuses a missing MODEL_DIR instead of making
  one, and leaves orbax's temporary folders of interrupted saves alone (the
  writer, `create=True`, removes them). `async_save`: orbax writes in the
  background (call `wait()`). Nothing here deletes or overwrites a checkpoint
  except orbax's keep-N after a successful save; an unusable one is moved to
  MODEL_DIR/damaged/ (`restore_newest_usable`). A committed checkpoint gets a
  file-size manifest (health.py) so a later missing or truncated
  file is named.
  """

  def __init__(self, model_dir: str | os.PathLike, keep: Optional[int] = None,
               async_save: bool = False, create: bool = True):
    if keep is not None and keep < 1:
      raise ValueError(f'keep must be >= 1 or None, got {keep}')
    self.directory = pathlib.Path(model_dir).absolute()
    self._async = async_save
    if not create and not self.directory.is_dir():
      raise FileNotFoundError(f'MODEL_DIR {self.directory} does not exist')
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, step_prefix=step_dirs.PREFIX, create=create,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=create)
    # Handlers named up front, so a fresh manager reads existing checkpoints.
    self._manager = ocp.CheckpointManager(
        str(self.directory), options=options,
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'extra': ocp.JsonCheckpointHandler()})

  def all_steps(self) -> list:
    """The committed steps on disk now (orbax's manager re-reads its directory)."""
    self._manager.reload()
    return sorted(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def step_dir(self, step: int) -> pathlib.Path:
    return self.directory / step_dirs.name(step)

  def save(self, step: int, state, extra: Optional[Mapping[str, Any]] = None):
    """Writes checkpoint_<step>; refuses to overwrite an existing one."""
    step = int(step)
    extra = dict(extra or {})
    try:
      json.dumps(extra)
    except TypeError as e:
      raise TypeError(f'checkpoint extra metadata must be JSON-serialisable: {e}') from e
    if step in self.all_steps() or self.step_dir(step).exists():
      raise CheckpointError(f'{self.step_dir(step)} already exists; refusing to overwrite it')
    with self._save_errors(step):
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(flax.serialization.to_state_dict(state)),
          extra=ocp.args.JsonSave(extra)))
    if not self._async:
      self._committed(step)

  def _remove_partial(self, step: int) -> None:
    """Removes the unfinished write of checkpoint_<step> (not a checkpoint), frees its space.

    Writes still in flight when the save failed may recreate files for a moment:
    repeat until the temporary folder stays gone.
    """
    pattern = f'{step_dirs.name(step)}.orbax-checkpoint-tmp*'
    for _ in range(40):
      partial = list(self.directory.glob(pattern))
      for tmp in partial:
        shutil.rmtree(tmp, ignore_errors=True)
      time.sleep(0.05)
      if not partial and not list(self.directory.glob(pattern)):
        return

  def wait(self) -> None:
    """Blocks until an asynchronous save has finished."""
    step = self._manager.latest_step()
    with self._save_errors(step):
      self._manager.wait_until_finished()
    if self._async and step is not None:
      self._committed(step)

  def _committed(self, step: int) -> None:
    if jax.process_index() == 0 and self.step_dir(step).is_dir():
      health.write_manifest(self.step_dir(step))

  @contextlib.contextmanager
  def _save_errors(self, step: Optional[int]):
    """A failed write -> CheckpointSaveError (one line); its partial files are removed."""
    try:
      yield
    except Exception as e:  # orbax / TensorStore raise many types for I/O errors.
      if step is None:
        raise
      self._remove_partial(step)
      previous = [s for s in self.all_steps() if s < step]
      kept = (f'the previous checkpoint {self.step_dir(previous[-1])} is intact'
              if previous else 'no earlier checkpoint exists')
      raise CheckpointSaveError(
          f'could not write checkpoint {self.step_dir(step)}: '
          f'{health.failure_reason(e)}; {kept}. Free space (or fix the cause) '
          'and rerun the same command to resume.') from e

  def close(self) -> None:
    self._manager.close()

  def _saved_tree(self, step: int):
    """(checkpoint dir, the saved state's metadata tree); errors for a missing or damaged one."""
    step_dir = self.step_dir(step)
    if int(step) not in self.all_steps():
      raise CheckpointError(f'no checkpoint for step {step} in {self.directory} '
                            f'(found steps {self.all_steps()})')
    damage = health.damage(step_dir)
    if damage:
      raise CheckpointCorruptError(f'checkpoint {step_dir} is damaged: {damage}')
    try:
      metadata = self._manager.item_metadata(step)['state']
      saved_tree = metadata.tree if hasattr(metadata, 'tree') else metadata
    except Exception as e:  # orbax / tensorstore raise many types for bad files.
      raise CheckpointCorruptError(
          f'checkpoint {step_dir} is damaged: its metadata is unreadable '
          f'({health.first_line(e)})') from e
    if saved_tree is None:
      raise CheckpointCorruptError(f'checkpoint {step_dir} has no readable state metadata')
    return step_dir, saved_tree

  @contextlib.contextmanager
  def _read_errors(self, step_dir):
    try:
      yield
    except Exception as e:  # orbax / tensorstore raise many types for bad files.
      raise CheckpointCorruptError(
          f'checkpoint {step_dir} is damaged: reading it failed '
          f'({health.first_line(e)})') from e

  def restore(self, step: int, target) -> Tuple[Any, dict]:
    """(state, extra) of checkpoint_<step>, placed as `target` says.

    `target`: a TrainState of `jax.ShapeDtypeStruct`s with shardings
    (`abstract_with_shardings`) or of arrays (their shardings are used).
    Raises CheckpointMismatchError (naming the directory and the differing
    params) if the checkpoint's tree, shapes or dtypes differ from `target`,
    and CheckpointCorruptError if its files cannot be read.
    """
    step_dir, saved_tree = self._saved_tree(step)
    target = jax.tree_util.tree_map(_abstract, target)
    target_dict = flax.serialization.to_state_dict(target)
    tree_check.check_fits(saved_tree, target_dict, f'checkpoint {step_dir}',
                          hint=' (written by a different model or optimizer)')
    with self._read_errors(step_dir):
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target_dict), extra=ocp.args.JsonRestore()))
      state = flax.serialization.from_state_dict(target, restored['state'])
    return state, dict(restored['extra'] or {})

  def restore_params(self, step: int, target) -> Tuple[Any, dict]:
    """(params, extra) of checkpoint_<step>: the parameters only (inference reads no
    optimizer state). `target`: the params tree of ShapeDtypeStructs with shardings."""
    step_dir, saved_tree = self._saved_tree(step)
    target = flax.core.unfreeze(jax.tree_util.tree_map(_abstract, target))
    tree_check.check_fits(saved_tree.get('params', {}), target, f'checkpoint {step_dir}',
                          hint=' (written by a different model)')
    item = {'params': target}
    restore_args = jax.tree_util.tree_map(
        lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape,
                                       dtype=x.dtype), item)
    with self._read_errors(step_dir), ocp.PyTreeCheckpointer() as reader:
      params = reader.restore(step_dir / 'state', args=ocp.args.PyTreeRestore(
          item=item, restore_args=restore_args, partial_restore=True))['params']
      extra = self._manager.restore(step, args=ocp.args.Composite(
          extra=ocp.args.JsonRestore()))['extra']
    return params, dict(extra or {})

  def move_aside(self, step: int) -> pathlib.Path:
    """Moves checkpoint_<step> to MODEL_DIR/damaged/ (see health.move_aside).

    Only for the process that holds MODEL_DIR (model_dir_lock.py).
    """
    moved = health.move_aside(self.step_dir(step))
    self._manager.reload()
    return moved


def _abstract(x) -> jax.ShapeDtypeStruct:
  """An array or ShapeDtypeStruct as a ShapeDtypeStruct with its sharding."""
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
