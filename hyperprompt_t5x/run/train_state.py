"""Train state, sharded jitted train / eval / predict steps, orbax checkpoints.

* `TrainState` (step, params, opt_state), created directly sharded: the
  init runs under `jax.jit(out_shardings=...)`, so no host ever holds a full
  copy of a large model.
* Parameter shardings come from the parameters' logical axes and the rules
  (partitioning.py); optimizer-state leaves shaped like their parameter take
  its sharding, the rest (Adafactor's factored row/column statistics, counts)
  are small and replicated.
* `make_train_step`: one jitted function with in/out shardings and the state
  donated; no host syncs inside. Frozen parameters get no gradient
  computation and are passed through untouched (bit-identical).
* `CheckpointStore`: orbax `CheckpointManager` over `MODEL_DIR`, T5X's
  `checkpoint_<step>` directories, keep-N, JSON metadata beside the state,
  and one clear error for a checkpoint of another model or a damaged one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import time
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.linen import partitioning as nn_partitioning
from jax.sharding import Mesh, NamedSharding

from hyperprompt_t5x.checkpoints import health
from hyperprompt_t5x import optim
from hyperprompt_t5x import partitioning
from hyperprompt_t5x.checkpoints.pretrained import CheckpointError

# T5Config fields that do not change the parameters (excluded from fingerprints).
RUNTIME_CONFIG_FIELDS = ('dtype', 'dropout_rate', 'attention_dropout_rate', 'attention_impl',
                         'remat_policy', 'embedding_lookup')


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array      # int32 scalar: optimizer steps taken
  params: Any          # nested dict of float32 arrays
  opt_state: Any       # optax state (no leaves for frozen params)


# -- shardings ----------------------------------------------------------------

def _path_keys(path) -> tuple:
  return tuple(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))) for k in path)


def _opt_state_shardings(opt_state_shapes, params_shapes, param_shardings, mesh: Mesh):
  """A sharding per optimizer-state leaf.

  A leaf whose path ends with a parameter's path and whose shape equals that
  parameter's (Adam moments, Adafactor's unfactored second moment) gets the
  parameter's sharding; everything else (factored statistics, counts) is
  replicated.
  """
  by_path = {}
  for (path, shape), (_, sharding) in zip(
      jax.tree_util.tree_flatten_with_path(params_shapes)[0],
      jax.tree_util.tree_flatten_with_path(param_shardings)[0]):
    by_path[_path_keys(path)] = (shape.shape, sharding)
  rep = partitioning.replicated(mesh)

  def leaf_sharding(path, leaf):
    keys = _path_keys(path)
    for n in range(len(keys), 0, -1):
      hit = by_path.get(keys[-n:])
      if hit is not None:
        return hit[1] if hit[0] == leaf.shape else rep
    return rep

  return jax.tree_util.tree_map_with_path(leaf_sharding, opt_state_shapes)


def state_shardings_for(model, optimizer: optax.GradientTransformation, mesh: Mesh,
                        rules, input_len: int, target_len: int):
  """(abstract TrainState, TrainState of NamedShardings) without allocating."""
  params_shapes = model.init_abstract(1, input_len, target_len)['params']
  params_shapes = flax.core.unfreeze(params_shapes)
  logical = model.logical_axes(input_len, target_len)
  param_shardings = partitioning.logical_to_mesh_sharding(logical, mesh, rules,
                                                          params_shapes)
  abstract = jax.eval_shape(
      lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p,
                           opt_state=optimizer.init(p)), params_shapes)
  shardings = TrainState(
      step=partitioning.replicated(mesh), params=param_shardings,
      opt_state=_opt_state_shardings(abstract.opt_state, params_shapes, param_shardings,
                                     mesh))
  return abstract, shardings


def abstract_with_shardings(abstract_state, state_shardings):
  """ShapeDtypeStructs carrying shardings: the restore target for `CheckpointStore`."""
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      abstract_state, state_shardings)


def _check_params_match(params, expected_shapes, where: str) -> None:
  got = {'/'.join(map(str, _path_keys(p))): (tuple(np.shape(x)), np.dtype(x.dtype))
         for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  want = {'/'.join(map(str, _path_keys(p))): (tuple(x.shape), np.dtype(x.dtype))
          for p, x in jax.tree_util.tree_flatten_with_path(expected_shapes)[0]}
  problems = _tree_diff(got, want)
  if problems:
    raise ValueError(f'{where} do not match the model: ' + '; '.join(problems))


def _tree_diff(got: Mapping[str, Any], want: Mapping[str, Any], limit: int = 20) -> list:
  problems = []
  missing = sorted(set(want) - set(got))
  extra = sorted(set(got) - set(want))
  if missing:
    problems.append(f'missing {len(missing)} param(s): {missing[:limit]}')
  if extra:
    problems.append(f'unexpected {len(extra)} param(s): {extra[:limit]}')
  differ = [f'{k}: {got[k]} vs model {want[k]}' for k in sorted(set(got) & set(want))
            if got[k] != want[k]]
  if differ:
    problems.append(f'{len(differ)} differ in shape/dtype: {differ[:limit]}')
  return problems


def place(x, sharding: NamedSharding, dtype) -> jax.Array:
  """Host or device array -> global array with `sharding` (each process: its shards)."""
  if isinstance(x, jax.Array):
    return jax.device_put(x.astype(dtype), sharding)
  host = np.asarray(x, dtype)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def create_train_state(model, optimizer: optax.GradientTransformation, rng: jax.Array,
                       mesh: Mesh, rules, input_len: int, target_len: int,
                       initial_params=None) -> Tuple[TrainState, TrainState]:
  """A fresh (or `initial_params`-seeded) TrainState, created sharded.

  Returns (state, state_shardings). `initial_params` (host or device arrays,
  e.g. a T5X checkpoint merged with fresh conditioning) must match the
  model's parameter tree exactly; they are placed with the parameter
  shardings and the optimizer state is initialised on device.
  """
  abstract, shardings = state_shardings_for(model, optimizer, mesh, rules, input_len,
                                            target_len)

  def from_params(params):
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params))

  # Parameter shardings come from out_shardings (no constraints needed in init).
  if initial_params is None:
    init = jax.jit(lambda r: from_params(flax.core.unfreeze(
        model.init(r, input_len, target_len))), out_shardings=shardings)
    state = init(rng)
  else:
    initial_params = flax.core.unfreeze(initial_params)
    _check_params_match(initial_params, abstract.params, 'initial_params')
    params = jax.tree_util.tree_map(lambda x, s, a: place(x, s, a.dtype),
                                    initial_params, shardings.params, abstract.params)
    state = jax.jit(from_params, in_shardings=(shardings.params,),
                    out_shardings=shardings)(params)
  return state, shardings


# -- steps --------------------------------------------------------------------

def _global_norm(tree) -> jax.Array:
  """sqrt of the sum of squares over all leaves (optax.tree.norm where it exists)."""
  tree_lib = getattr(optax, 'tree', None)
  if tree_lib is not None and hasattr(tree_lib, 'norm'):
    return tree_lib.norm(tree)
  return optax.global_norm(tree)


@contextlib.contextmanager
def _activation_context(mesh: Mesh, activation_rules):
  """Mesh + logical rules for the network's activation constraints, if asked for.

  activation_rules=None: no constraints; XLA propagates the shardings of the
  parameters and the batch (enough for data parallelism and small models).
  """
  if activation_rules is None:
    yield
    return
  with jax.set_mesh(mesh), nn_partitioning.axis_rules(activation_rules):
    yield


def _split(tree, mask):
  """(trainable, frozen) trees; absent leaves are None."""
  trainable = jax.tree_util.tree_map(lambda x, m: x if m else None, tree, mask)
  frozen = jax.tree_util.tree_map(lambda x, m: None if m else x, tree, mask)
  return trainable, frozen


def _merge(trainable, frozen, mask):
  return jax.tree_util.tree_map(lambda m, a, b: a if m else b, mask, trainable, frozen,
                                is_leaf=lambda x: x is None)


def make_train_step(model, optimizer: optax.GradientTransformation, mesh: Mesh,
                    state_shardings: TrainState, *, freeze: str = 'all',
                    activation_rules=None, schedule: Optional[Callable] = None,
                    donate: bool = True) -> Callable:
  """Jitted `step_fn(state, batch, rng) -> (new_state, metrics)`.

  Dropout key = fold_in(rng, state.step) (rng defaults to PRNGKey(0)), so a
  resumed run reproduces the same dropout masks. `freeze` must be the one given to `make_optimizer`:
  gradients are taken only for trainable params, and frozen ones are copied
  through unchanged. `activation_rules`: logical rules to turn on the
  network's activation sharding constraints (T5X does; off by default). metrics: the model's (loss, z_loss, cross_ent_loss,
  accuracy, num_tokens) plus grad_norm and, with `schedule`, learning_rate
  (of the step just taken). All values stay on device.
  """
  mask = optim.trainable_mask(state_shardings.params, freeze)
  all_trainable = freeze == 'all'

  def step_fn(state: TrainState, batch, rng):
    dropout_rng = jax.random.fold_in(rng, state.step)
    if all_trainable:
      def loss_of(params):
        return model.loss_fn(params, batch, dropout_rng)
      (_, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
      grad_norm = _global_norm(grads)
    else:
      trainable, frozen = _split(state.params, mask)

      def loss_of(train_params):
        return model.loss_fn(_merge(train_params, frozen, mask), batch, dropout_rng)
      (_, metrics), train_grads = jax.value_and_grad(loss_of, has_aux=True)(trainable)
      grad_norm = _global_norm(train_grads)
      # The optimizer routes frozen leaves to set_to_zero; zeros are never read.
      grads = _merge(train_grads, jax.tree_util.tree_map(jnp.zeros_like, frozen), mask)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    if all_trainable:
      params = optax.apply_updates(state.params, updates)
    else:
      params = jax.tree_util.tree_map(
          lambda m, p, u: (p + u).astype(p.dtype) if m else p, mask, state.params, updates)
    metrics = dict(metrics, grad_norm=grad_norm)
    if schedule is not None:
      metrics['learning_rate'] = jnp.asarray(schedule(state.step), jnp.float32)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  rep = partitioning.replicated(mesh)
  jitted = jax.jit(step_fn,
                   in_shardings=(state_shardings, partitioning.batch_sharding(mesh), rep),
                   out_shardings=(state_shardings, rep),
                   donate_argnums=(0,) if donate else ())

  default_rng = jax.random.PRNGKey(0)

  def run(state, batch, rng=None):
    with _activation_context(mesh, activation_rules):
      return jitted(state, batch, default_rng if rng is None else rng)

  run.jitted = jitted
  return run


def make_eval_step(model, mesh: Mesh, state_shardings: TrainState, *,
                   activation_rules=None) -> Callable:
  """Jitted `eval_fn(params, batch) -> metrics` (no dropout) and per-example scores.

  metrics: the model's loss metrics plus `scores` [batch] (sum log-likelihood).
  """

  def eval_fn(params, batch):
    _, metrics = model.loss_fn(params, batch, None)
    return dict(metrics, scores=model.score_batch(params, batch))

  data = partitioning.batch_sharding(mesh)
  jitted = jax.jit(eval_fn, in_shardings=(state_shardings.params, data))

  def run(params, batch):
    with _activation_context(mesh, activation_rules):
      return jitted(params, batch)
  return run


def make_predict_fn(model, mesh: Mesh, state_shardings: TrainState, *,
                    max_decode_length: Optional[int] = None, activation_rules=None) -> Callable:
  """Jitted `predict_fn(params, batch) -> int32 [batch, len]` (greedy, cached)."""
  data = partitioning.batch_sharding(mesh)
  jitted = jax.jit(lambda params, batch: model.predict_batch(params, batch,
                                                             max_decode_length),
                   in_shardings=(state_shardings.params, data), out_shardings=data)

  def run(params, batch):
    with _activation_context(mesh, activation_rules):
      return jitted(params, batch)
  return run


# -- checkpoints ----------------------------------------------------------------

class CheckpointMismatchError(CheckpointError):
  """The checkpoint in MODEL_DIR belongs to a different model or optimizer."""


class CheckpointCorruptError(CheckpointError):
  """A checkpoint's files are missing, truncated or unreadable."""


class CheckpointSaveError(CheckpointError):
  """Writing a checkpoint failed (no space, ...); the previous ones are intact."""


def config_fingerprint(config, exclude=RUNTIME_CONFIG_FIELDS) -> str:
  """A short hash of the config fields that shape the parameters.

  Runtime knobs (dropout, dtype, attention implementation, remat, lookup)
  are excluded: a run may resume with them changed.
  """
  fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
            if f.name not in exclude}
  text = json.dumps(fields, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _flat_shapes(tree) -> Dict[str, Tuple[tuple, str]]:
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    shape = getattr(leaf, 'shape', None)
    dtype = getattr(leaf, 'dtype', None)
    out['/'.join(map(str, _path_keys(path)))] = (
        tuple(shape) if shape is not None else None,
        str(np.dtype(dtype)) if dtype is not None else None)
  return out


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
    import orbax.checkpoint as ocp  # Heavy import, only where checkpoints are used.
    self._ocp = ocp
    if keep is not None and keep < 1:
      raise ValueError(f'keep must be >= 1 or None, got {keep}')
    self.directory = pathlib.Path(model_dir).absolute()
    self._async = async_save
    if not create and not self.directory.is_dir():
      raise FileNotFoundError(f'MODEL_DIR {self.directory} does not exist')
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, step_prefix='checkpoint', create=create,
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
    return self.directory / f'checkpoint_{step}'

  def save(self, step: int, state: TrainState, extra: Optional[Mapping[str, Any]] = None):
    """Writes checkpoint_<step>; refuses to overwrite an existing one."""
    step = int(step)
    extra = dict(extra or {})
    try:
      json.dumps(extra)
    except TypeError as e:
      raise TypeError(f'checkpoint extra metadata must be JSON-serialisable: {e}') from e
    if step in self.all_steps() or self.step_dir(step).exists():
      raise CheckpointError(f'{self.step_dir(step)} already exists; refusing to overwrite it')
    ocp = self._ocp
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
    pattern = f'checkpoint_{step}.orbax-checkpoint-tmp*'
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

  def restore(self, step: int, target) -> Tuple[TrainState, dict]:
    """(state, extra) of checkpoint_<step>, placed as `target` says.

    `target`: a TrainState of `jax.ShapeDtypeStruct`s with shardings
    (`abstract_with_shardings`) or of arrays (their shardings are used).
    Raises CheckpointMismatchError (naming the directory and the differing
    params) if the checkpoint's tree, shapes or dtypes differ from `target`,
    and CheckpointCorruptError if its files cannot be read.
    """
    ocp = self._ocp
    step_dir = self.step_dir(step)
    if int(step) not in self.all_steps():
      raise CheckpointError(f'no checkpoint for step {step} in {self.directory} '
                            f'(found steps {self.all_steps()})')
    damage = health.damage(step_dir)
    if damage:
      raise CheckpointCorruptError(f'checkpoint {step_dir} is damaged: {damage}')
    target = jax.tree_util.tree_map(
        lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=x.sharding), target)
    target_dict = flax.serialization.to_state_dict(target)
    try:
      metadata = self._manager.item_metadata(step)['state']
      saved_tree = metadata.tree if hasattr(metadata, 'tree') else metadata
    except Exception as e:  # orbax / tensorstore raise many types for bad files.
      raise CheckpointCorruptError(
          f'checkpoint {step_dir} is damaged: its metadata is unreadable '
          f'({health.first_line(e)})') from e
    if saved_tree is None:
      raise CheckpointCorruptError(f'checkpoint {step_dir} has no readable state metadata')
    problems = _tree_diff(_flat_shapes(saved_tree), _flat_shapes(target_dict))
    if problems:
      raise CheckpointMismatchError(
          f'checkpoint {step_dir} was written by a different model or optimizer '
          '(checkpoint vs this model): ' + '; '.join(problems))
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target_dict), extra=ocp.args.JsonRestore()))
      state_dict = restored['state']
      extra = restored['extra'] or {}
      state = flax.serialization.from_state_dict(target, state_dict)
    except Exception as e:
      raise CheckpointCorruptError(
          f'checkpoint {step_dir} is damaged: reading it failed '
          f'({health.first_line(e)})') from e
    return state, dict(extra)

  def move_aside(self, step: int) -> pathlib.Path:
    """Moves checkpoint_<step> to MODEL_DIR/damaged/ (see health.move_aside).

    Only for the process that holds MODEL_DIR (model_dir_lock.py).
    """
    moved = health.move_aside(self.step_dir(step))
    self._manager.reload()
    return moved
