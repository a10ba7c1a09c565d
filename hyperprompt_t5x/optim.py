"""Optimisers, learning-rate schedules and freeze masks (optax).

* Adafactor exactly as T5X fine-tunes T5 (the default: T5X's
  `adafactor.Adafactor` update, factored by logical axis names) and AdamW.
* Schedules with T5X's meaning of `learning_rate` (a base multiplier; for
  `rsqrt` it is divided by sqrt(max(step, warmup_steps)) as in T5X's
  `constant * rsqrt_decay`).
* Freeze modes: which parameters train. Frozen parameters get no optimizer
  state at all (`optax.multi_transform` masks them out and `optax.set_to_zero`
  keeps an empty state), and the train step leaves them bit-identical.

Everything here imports only JAX and optax.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

# Every task-conditioning parameter lives under this top-level key
# (docs/ARCHITECTURE.md); prompts under CONDITIONING_KEY/prompts.
CONDITIONING_KEY = 'task_conditioning'
PROMPTS_KEY = 'prompts'

SCHEDULES = ('constant', 'rsqrt', 'linear_warmup_rsqrt', 'warmup_constant', 'cosine')
OPTIMIZERS = ('adafactor', 'adamw')
# The value names what trains: everything (the paper's default), only the
# task-conditioning parameters, or only the prompts.
FREEZE_MODES = ('all', 'conditioning', 'prompts')

Schedule = Callable[[Any], jax.Array]


def _choice_error(what: str, value: Any, valid) -> ValueError:
  return ValueError(f'unknown {what} {value!r}; valid choices: {", ".join(valid)}')


def make_schedule(kind: str = 'constant',
                  learning_rate: float = 1e-3,
                  warmup_steps: int = 0,
                  decay_steps: Optional[int] = None,
                  end_learning_rate: float = 0.0) -> Schedule:
  """A step -> learning-rate function (float32), jit-friendly.

  kinds (lr = learning_rate, w = warmup_steps, s = step):
    constant:            lr
    rsqrt:               lr / sqrt(max(s, w, 1))                (T5X rsqrt_decay)
    linear_warmup_rsqrt: lr * min(1, s / w) / sqrt(max(s, w, 1))
    warmup_constant:     lr * min(1, s / w)
    cosine:              linear warm-up to lr over w steps, then cosine decay
                         to end_learning_rate at step decay_steps.
  """
  if kind not in SCHEDULES:
    raise _choice_error('learning-rate schedule', kind, SCHEDULES)
  if warmup_steps < 0:
    raise ValueError(f'warmup_steps must be >= 0, got {warmup_steps}')
  lr = float(learning_rate)
  w = float(warmup_steps)

  def warmup(step):
    if warmup_steps == 0:
      return jnp.float32(1.0)
    return jnp.minimum(1.0, step / w)

  if kind == 'constant':
    return lambda step: jnp.full((), lr, jnp.float32)
  if kind == 'rsqrt':
    return lambda step: lr * jax.lax.rsqrt(
        jnp.maximum(jnp.asarray(step, jnp.float32), max(w, 1.0)))
  if kind == 'linear_warmup_rsqrt':
    def linear_warmup_rsqrt(step):
      step = jnp.asarray(step, jnp.float32)
      return lr * warmup(step) * jax.lax.rsqrt(jnp.maximum(step, max(w, 1.0)))
    return linear_warmup_rsqrt
  if kind == 'warmup_constant':
    return lambda step: lr * warmup(jnp.asarray(step, jnp.float32))
  # cosine
  if decay_steps is None or decay_steps <= warmup_steps:
    raise ValueError(f'cosine schedule needs decay_steps > warmup_steps, got '
                     f'decay_steps={decay_steps}, warmup_steps={warmup_steps}')
  sched = optax.warmup_cosine_decay_schedule(
      init_value=0.0 if warmup_steps else lr, peak_value=lr, warmup_steps=warmup_steps,
      decay_steps=decay_steps, end_value=end_learning_rate)
  return lambda step: jnp.asarray(sched(step), jnp.float32)


def _path_keys(path) -> tuple:
  return tuple(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))) for k in path)


def trainable_mask(params, freeze: str = 'all'):
  """A pytree of Python bools, True where the parameter trains.

  freeze='all': everything; 'conditioning': only `task_conditioning/...`;
  'prompts': only `task_conditioning/prompts...`. Works on concrete or
  abstract (`jax.ShapeDtypeStruct`) parameter trees.
  """
  if freeze not in FREEZE_MODES:
    raise _choice_error('freeze mode', freeze, FREEZE_MODES)
  prefix = {'all': (), 'conditioning': (CONDITIONING_KEY,),
            'prompts': (CONDITIONING_KEY, PROMPTS_KEY)}[freeze]
  mask = jax.tree_util.tree_map_with_path(
      lambda path, _: _path_keys(path)[:len(prefix)] == prefix, params)
  if not any(jax.tree_util.tree_leaves(mask)):
    top = sorted(params) if isinstance(params, Mapping) else type(params).__name__
    raise ValueError(
        f"freeze={freeze!r} leaves nothing to train: the parameters have no "
        f"'{'/'.join(prefix)}' subtree (top-level keys: {top}); use a "
        f"conditioning method with that subtree or freeze='all'")
  return mask


# T5X's Adafactor factor rules (`adafactor.standard_logical_factor_rules`) for
# the backbone's logical axes, plus one for each task-conditioning axis
# (partitioning.CONDITIONING_AXES). Values are T5X's factor names, so the same
# dict configures `t5x.adafactor.Adafactor(logical_factor_rules=...)`.
# Conditioning axes are all 'none': no conditioning leaf is factored and its
# parameter scale and update clipping run over the whole leaf, which is what
# T5X's heuristic does for a 2-D leaf without two dimensions >= 128 (none has).
LOGICAL_FACTOR_RULES = {
    'vocab': 'column', 'embed': 'row', 'mlp': 'column', 'heads': 'column',
    'kv': 'column', 'joined_kv': 'column', 'relpos_buckets': 'none',
    'layers': 'batch', 'stack': 'batch', 'q_wi_fused': 'column', 'o_wo_fused': 'column',
    'multiquery_heads': 'column', 'kv_fused': 'column', 'layer_norm_scale': 'none',
    'mlp_activations': 'column',
    'tasks': 'none', 'prompt_len': 'none', 'task_embed': 'none', 'layer_task': 'none',
    'layer_task_hidden': 'none', 'hyper_blocks': 'none', 'hyper_bottleneck': 'none',
    'hyper_generated': 'none', 'hyper_layers': 'none', 'hyper_positions': 'none',
}
# T5X's factor names (and its FactorDim members' names) -> the kind used here.
_FACTOR_KINDS = {'row': 'row', 'col': 'column', 'column': 'column', 'batch': 'batch',
                 'none': 'none', 'unfactorized': 'none'}


class FactorSpec(NamedTuple):
  """How Adafactor treats one parameter (T5X's `_parse_rule`).

  averaging_dims: dims the parameter scale and update clipping average over
    (all but 'batch' dims). rows / cols: the factored second moment keeps
    v_row = mean(g^2 over cols) and v_col = mean(g^2 over rows); None: a full
    second moment v shaped like the parameter.
  """
  averaging_dims: Tuple[int, ...]
  rows: Optional[Tuple[int, ...]]
  cols: Optional[Tuple[int, ...]]


def factor_spec(shape: Sequence[int], axes: Optional[Sequence[str]] = None, *,
                rules: Mapping[str, str] = LOGICAL_FACTOR_RULES,
                min_dim_size_to_factor: int = 128, name: str = '?') -> FactorSpec:
  """T5X's factoring decision for a parameter of `shape` with logical `axes`.

  Rank <= 2 without a 'batch' axis (or no axes given): T5X's heuristic, the
  two largest dims factored if the smaller of them is >= min_dim_size_to_factor.
  Otherwise the rules: 'row' dims against 'column' dims, unfactored unless
  both kinds occur; 'batch' dims are excluded from every average.
  """
  ndim = len(shape)
  every = tuple(range(ndim))
  if axes is not None:
    if len(axes) != ndim:
      raise ValueError(f'parameter {name}: {len(axes)} logical axes {tuple(axes)} for '
                       f'shape {tuple(shape)}')
    unknown = [a for a in axes if a not in rules]
    if unknown:
      raise ValueError(f'parameter {name}: no Adafactor factor rule for logical axis '
                       f'{unknown[0]!r} (axes {tuple(axes)}); add one to '
                       'optim.LOGICAL_FACTOR_RULES')
    kinds = tuple(_FACTOR_KINDS.get(str(getattr(rules[a], 'name', rules[a])).lower())
                  for a in axes)
    if None in kinds:
      raise ValueError(f'parameter {name}: factor rule {rules[axes[kinds.index(None)]]!r} '
                       f'is not one of {sorted(_FACTOR_KINDS)}')
    batch = tuple(d for d in every if kinds[d] == 'batch')
    if ndim > 2 or batch:
      if {'row', 'column', 'none'} <= set(kinds):
        raise ValueError(f'parameter {name}: incomplete Adafactor spec {kinds} for axes '
                         f'{tuple(axes)} (row, column and none together)')
      averaging = tuple(d for d in every if d not in batch)
      rows = tuple(d for d in every if kinds[d] == 'row')
      cols = tuple(d for d in every if kinds[d] == 'column')
      if rows and cols:
        return FactorSpec(averaging, rows, cols)
      return FactorSpec(averaging, None, None)
  if ndim < 2:
    return FactorSpec(every, None, None)
  order = np.argsort(shape)
  if shape[order[-2]] < min_dim_size_to_factor:
    return FactorSpec(every, None, None)
  return FactorSpec(every, (int(order[-2]),), (int(order[-1]),))


class ScaleByT5XAdafactorState(NamedTuple):
  """T5X's Adafactor state: its step and, per parameter, v_row / v_col / v.

  Unused slots hold zeros of shape (1,), as in T5X, so a T5X checkpoint's
  `state/param_states/<param>/{v_row,v_col,v}` map onto these one to one.
  """
  count: jax.Array
  v_row: Any
  v_col: Any
  v: Any


def _flat_axes(tree: Any, prefix: tuple = ()) -> dict:
  """{param path tuple: tuple of logical names} from a tree of PartitionSpecs."""
  if isinstance(tree, Mapping):
    out = {}
    for k, v in tree.items():
      out.update(_flat_axes(v, prefix + (k,)))
    return out
  return {prefix: tuple(tree)}


def scale_by_t5x_adafactor(param_axes=None, *, decay_rate: float = 0.8,
                           step_offset: int = 0, clipping_threshold: Optional[float] = 1.0,
                           multiply_by_parameter_scale: bool = True,
                           min_dim_size_to_factor: int = 128, epsilon1: float = 1e-30,
                           epsilon2: float = 1e-3,
                           rules: Mapping[str, str] = LOGICAL_FACTOR_RULES
                           ) -> optax.GradientTransformation:
  """T5X's Adafactor direction, without the learning rate: g -> scale * clip(g / sqrt(v)).

  optax.scale_by_factored_rms factors the two largest dims of every leaf; T5X
  factors by logical axis names (a [embed, heads, kv] kernel: embed rows
  against heads x kv columns) and excludes 'batch' axes from its averages,
  so this transformation follows `factor_spec`. Per parameter, with
  beta_t = 1 - (t - step_offset + 1)^-decay_rate and g2 = g^2 + epsilon1:
    factored:   v_row = beta v_row + (1 - beta) mean_cols(g2),
                v_col = beta v_col + (1 - beta) mean_rows(g2),
                y = g / sqrt(v_row / mean_rows(v_row)) / sqrt(v_col)
    unfactored: v = beta v + (1 - beta) g2,  y = g / sqrt(v)
    y /= max(1, RMS(y) / clipping_threshold)
    y *= max(RMS(param), epsilon2)                 (multiply_by_parameter_scale)
  `param_axes`: a tree of logical-axis tuples / PartitionSpecs matching the
  parameters (None: T5X's heuristic for every leaf). Masked (frozen) leaves
  are looked up by path, so `optax.multi_transform` may hide any of them.
  """
  axes_by_path = _flat_axes(param_axes) if param_axes is not None else {}

  def spec(path, shape) -> FactorSpec:
    keys = _path_keys(path)
    return factor_spec(shape, axes_by_path.get(keys) if param_axes is not None else None,
                       rules=rules, min_dim_size_to_factor=min_dim_size_to_factor,
                       name='/'.join(map(str, keys)))

  def init_fn(params):
    if param_axes is not None:  # every logical axis needs a rule: fail at build time
      jax.tree_util.tree_map_with_path(lambda p, x: spec(p, x.shape), params)

    def slot(kind):
      def leaf(path, p):
        s = spec(path, p.shape)
        if kind == 'v':
          shape = p.shape if s.rows is None else (1,)
        elif s.rows is None:
          shape = (1,)
        else:
          shape = tuple(np.delete(p.shape, s.cols if kind == 'v_row' else s.rows))
        return jnp.zeros(shape, jnp.float32)
      return jax.tree_util.tree_map_with_path(leaf, params)
    return ScaleByT5XAdafactorState(jnp.zeros((), jnp.int32), slot('v_row'), slot('v_col'),
                                    slot('v'))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError('scale_by_t5x_adafactor needs the parameters in update()')
    t = (state.count - step_offset).astype(jnp.float32) + 1.0
    beta = 1.0 - t ** (-decay_rate)

    def leaf(path, g, p, v_row, v_col, v):
      s = spec(path, p.shape)
      g = g.astype(jnp.float32)
      g2 = g * g + epsilon1
      if s.rows is not None:
        v_row = beta * v_row + (1.0 - beta) * jnp.mean(g2, axis=s.cols)
        v_col = beta * v_col + (1.0 - beta) * jnp.mean(g2, axis=s.rows)
        rows_in_v_row = tuple(d - sum(c < d for c in s.cols) for d in s.rows)
        row_mean = jnp.mean(v_row, axis=rows_in_v_row, keepdims=True)
        y = (g * jnp.expand_dims((v_row / row_mean) ** -0.5, s.cols)
             * jnp.expand_dims(v_col ** -0.5, s.rows))
      else:
        v = beta * v + (1.0 - beta) * g2
        y = g * v ** -0.5
      if clipping_threshold is not None:
        rms = jnp.sqrt(jnp.mean(y * y, axis=s.averaging_dims, keepdims=True))
        y = y / jnp.maximum(1.0, rms / clipping_threshold)
      if multiply_by_parameter_scale:
        scale = jnp.sqrt(jnp.mean(p * p, axis=s.averaging_dims, keepdims=True))
        y = y * jnp.maximum(scale, epsilon2)
      return y, v_row, v_col, v

    out = jax.tree_util.tree_map_with_path(leaf, updates, params, state.v_row, state.v_col,
                                           state.v)
    treedef = jax.tree_util.tree_structure(updates)
    parts = [treedef.unflatten(x) for x in zip(*treedef.flatten_up_to(out))] if (
        treedef.num_leaves) else [updates] * 4
    return parts[0], ScaleByT5XAdafactorState(optax.safe_int32_increment(state.count),
                                              *parts[1:])

  return optax.GradientTransformation(init_fn, update_fn)


def _is_adafactor_state(x) -> bool:
  return isinstance(x, ScaleByT5XAdafactorState)


def find_adafactor_state(opt_state) -> Optional[ScaleByT5XAdafactorState]:
  """The `ScaleByT5XAdafactorState` inside an optimizer state (chain / masks), or None."""
  for node in jax.tree_util.tree_leaves(opt_state, is_leaf=_is_adafactor_state):
    if _is_adafactor_state(node):
      return node
  return None


def flatten_t5x_param_states(state: ScaleByT5XAdafactorState) -> dict:
  """{'encoder/.../kernel': {'v_row', 'v_col', 'v'}}: T5X's `param_states` layout.

  Masked (frozen) parameters hold no slots and are absent.
  """
  out: dict = {}
  for slot in ('v_row', 'v_col', 'v'):
    for path, x in jax.tree_util.tree_flatten_with_path(getattr(state, slot))[0]:
      out.setdefault('/'.join(map(str, _path_keys(path))), {})[slot] = x
  return out


def restore_adafactor_state(opt_state, step: int, param_states: Mapping[str, Mapping[str, Any]],
                            *, source: str = '<checkpoint>',
                            skip_prefix: Optional[str] = CONDITIONING_KEY):
  """`opt_state` with the Adafactor slots and step of a checkpoint.

  Args:
    opt_state: a fresh optimizer state holding a `ScaleByT5XAdafactorState`.
    step: the checkpoint's Adafactor step (T5X `state/step`).
    param_states: {'encoder/.../kernel': {'v_row', 'v_col', 'v'}} (T5X's
      `param_states`; an `m` slot is ignored: no momentum).
    skip_prefix: parameters under it keep fresh slots (the task conditioning,
      whose parameters are freshly initialised too); None: none.

  Returns:
    (opt_state, restored names, fresh names). Nothing is replaced, and the
    step is not restored, when no parameter's slots are in `param_states`.

  Raises:
    ValueError: a slot whose shape differs from this optimizer's (another
      factoring or optimizer wrote the checkpoint); lists every such slot.
  """
  restored, fresh, wrong = [], [], []

  def fill(node):
    if not _is_adafactor_state(node):
      return node
    slots = {}
    for slot in ('v_row', 'v_col', 'v'):
      def leaf(path, x, slot=slot):
        name = '/'.join(map(str, _path_keys(path)))
        saved = (None if skip_prefix and name.startswith(skip_prefix)
                 else param_states.get(name))
        if saved is None or slot not in saved:
          if slot == 'v':
            fresh.append(name)
          return x
        value = np.asarray(saved[slot], np.float32)
        if value.shape != tuple(x.shape):
          wrong.append(f'{name}/{slot}: checkpoint {value.shape}, optimizer {tuple(x.shape)}')
          return x
        if slot == 'v':
          restored.append(name)
        return value
      slots[slot] = jax.tree_util.tree_map_with_path(leaf, getattr(node, slot))
    return node._replace(count=np.asarray(step, np.int32), **slots)

  filled = jax.tree_util.tree_map(fill, opt_state, is_leaf=_is_adafactor_state)
  if wrong:
    raise ValueError(
        f'{source}: its Adafactor state does not fit this optimizer (another factoring or '
        f'optimizer wrote it): {"; ".join(wrong[:10])}'
        + (f' (+{len(wrong) - 10} more)' if len(wrong) > 10 else '')
        + '. Set RESTORE_OPTIMIZER_STATE = False to start the optimizer fresh.')
  if not restored:
    return opt_state, [], fresh
  return filled, restored, fresh


def _base_optimizer(name: str, schedule: Schedule, *, weight_decay: float,
                    b1: float, b2: float, eps: float, param_axes,
                    multiply_by_parameter_scale: bool,
                    decay_rate: float, clipping_threshold: Optional[float],
                    min_dim_size_to_factor: int) -> optax.GradientTransformation:
  if name == 'adafactor':
    # T5X's adafactor.Adafactor as t5_1_1/*.gin use it (scale_by_t5x_adafactor),
    # then the learning rate, T5X's weight_decay_rate (not scaled by it) and the
    # sign: param <- (1 - weight_decay) param - lr * y.
    return optax.chain(
        scale_by_t5x_adafactor(
            param_axes, decay_rate=decay_rate, step_offset=0,
            clipping_threshold=clipping_threshold,
            multiply_by_parameter_scale=multiply_by_parameter_scale,
            min_dim_size_to_factor=min_dim_size_to_factor),
        optax.scale_by_learning_rate(schedule, flip_sign=False),
        optax.add_decayed_weights(weight_decay) if weight_decay else optax.identity(),
        optax.scale(-1.0))
  if name == 'adamw':
    return optax.adamw(learning_rate=schedule, b1=b1, b2=b2, eps=eps,
                       weight_decay=weight_decay)
  raise _choice_error('optimizer', name, OPTIMIZERS)


def make_optimizer(name: str = 'adafactor',
                   schedule: Schedule | float = 1e-3,
                   *,
                   params,
                   param_axes=None,
                   freeze: str = 'all',
                   weight_decay: float = 0.0,
                   clip_norm: Optional[float] = None,
                   b1: float = 0.9,
                   b2: float = 0.999,
                   eps: float = 1e-8,
                   multiply_by_parameter_scale: bool = True,
                   decay_rate: float = 0.8,
                   clipping_threshold: Optional[float] = 1.0,
                   min_dim_size_to_factor: int = 128) -> optax.GradientTransformation:
  """An optax transformation over the whole parameter tree.

  Args:
    name: 'adafactor' (T5X's `adafactor.Adafactor` with its defaults:
      decay_rate 0.8, step_offset 0, parameter-scale multiplication,
      update clipping 1.0, no momentum, epsilon1 1e-30, epsilon2 1e-3,
      factored by `LOGICAL_FACTOR_RULES`) or 'adamw'.
    schedule: a step -> lr function (`make_schedule`) or a constant float.
    params: the parameter tree (concrete or abstract); only its structure and
      paths are used, to build the freeze labels.
    param_axes: logical axis names per parameter (`model.logical_axes(...)`),
      for Adafactor's factoring; None: T5X's two-largest-dims heuristic.
    freeze: which parameters train ('all' | 'conditioning' | 'prompts').
    weight_decay: AdamW's decoupled weight decay (times the learning rate), or
      T5X Adafactor's weight_decay_rate (not times the learning rate).
    clip_norm: if set, clip the trainable gradients to this global norm first.
  Frozen parameters are routed to `optax.set_to_zero()`: they hold no state
  and get zero updates.
  """
  if name not in OPTIMIZERS:
    raise _choice_error('optimizer', name, OPTIMIZERS)
  if not callable(schedule):
    schedule = make_schedule('constant', float(schedule))
  mask = trainable_mask(params, freeze)
  base = _base_optimizer(
      name, schedule, weight_decay=weight_decay, b1=b1, b2=b2, eps=eps,
      param_axes=param_axes, multiply_by_parameter_scale=multiply_by_parameter_scale,
      decay_rate=decay_rate, clipping_threshold=clipping_threshold,
      min_dim_size_to_factor=min_dim_size_to_factor)
  if clip_norm is not None:
    base = optax.chain(optax.clip_by_global_norm(clip_norm), base)
  if freeze == 'all':
    return base
  labels = jax.tree_util.tree_map(lambda m: 'train' if m else 'frozen', mask)
  return optax.multi_transform({'train': base, 'frozen': optax.set_to_zero()}, labels)


def count_state_leaves(opt_state) -> int:
  """Number of array leaves in an optimizer state (masked parameters hold none)."""
  return len(jax.tree_util.tree_leaves(opt_state))
