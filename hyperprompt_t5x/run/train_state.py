"""Train state and the sharded jitted train / eval / predict steps.

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
* Checkpoints of the TrainState: checkpoints/store.py.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.linen import partitioning as nn_partitioning
from jax.sharding import Mesh, NamedSharding

from hyperprompt_t5x import optim, partitioning
from hyperprompt_t5x.checkpoints import tree_check


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
    tree_check.check_fits(initial_params, abstract.params, 'initial_params')
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


def make_eval_step(model, mesh: Mesh, param_shardings, *,
                   activation_rules=None) -> Callable:
  """Jitted `eval_fn(params, batch) -> metrics` (no dropout) and per-example scores.

  metrics: the model's loss metrics plus `scores` [batch] (sum log-likelihood).
  """

  def eval_fn(params, batch):
    _, metrics = model.loss_fn(params, batch, None)
    return dict(metrics, scores=model.score_batch(params, batch))

  data = partitioning.batch_sharding(mesh)
  jitted = jax.jit(eval_fn, in_shardings=(param_shardings, data))

  def run(params, batch):
    with _activation_context(mesh, activation_rules):
      return jitted(params, batch)
  return run


def make_predict_fn(model, mesh: Mesh, param_shardings, *,
                    max_decode_length: Optional[int] = None, activation_rules=None) -> Callable:
  """Jitted `predict_fn(params, batch) -> int32 [batch, len]` (greedy, cached)."""
  data = partitioning.batch_sharding(mesh)
  jitted = jax.jit(lambda params, batch: model.predict_batch(params, batch,
                                                             max_decode_length),
                   in_shardings=(param_shardings, data), out_shardings=data)

  def run(params, batch):
    with _activation_context(mesh, activation_rules):
      return jitted(params, batch)
  return run
