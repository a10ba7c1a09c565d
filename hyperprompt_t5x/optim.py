"""Optimisers, learning-rate schedules and freeze masks (optax).

* Adafactor as T5X fine-tunes T5 (the default) and AdamW.
* Schedules with T5X's meaning of `learning_rate` (a base multiplier; for
  `rsqrt` it is divided by sqrt(max(step, warmup_steps)) as in T5X's
  `constant * rsqrt_decay`).
* Freeze modes: which parameters train. Frozen parameters get no optimizer
  state at all (`optax.multi_transform` masks them out and `optax.set_to_zero`
  keeps an empty state), and the train step leaves them bit-identical.

Everything here imports only JAX and optax.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
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


def _base_optimizer(name: str, schedule: Schedule, *, weight_decay: float,
                    b1: float, b2: float, eps: float,
                    multiply_by_parameter_scale: bool,
                    decay_rate: float, clipping_threshold: Optional[float],
                    min_dim_size_to_factor: int) -> optax.GradientTransformation:
  if name == 'adafactor':
    # T5X's Adafactor as optax builds it: factored second moments
    # (min_dim_size_to_factor 128), decay_rate 0.8 (beta2_t = 1 - t^-0.8),
    # no momentum, update clipping at RMS 1.0, epsilon 1e-30, and by default
    # the update is lr * clipped normalised gradient (no parameter-scale
    # multiplication; T5X's own default multiplies by max(RMS(param), 1e-3):
    # set multiply_by_parameter_scale=True for that).
    return optax.adafactor(
        learning_rate=schedule,
        min_dim_size_to_factor=min_dim_size_to_factor,
        decay_rate=decay_rate,
        decay_offset=0,
        multiply_by_parameter_scale=multiply_by_parameter_scale,
        clipping_threshold=clipping_threshold,
        momentum=None,
        weight_decay_rate=weight_decay or None,
        eps=1e-30,
        factored=True)
  if name == 'adamw':
    return optax.adamw(learning_rate=schedule, b1=b1, b2=b2, eps=eps,
                       weight_decay=weight_decay)
  raise _choice_error('optimizer', name, OPTIMIZERS)


def make_optimizer(name: str = 'adafactor',
                   schedule: Schedule | float = 1e-3,
                   *,
                   params,
                   freeze: str = 'all',
                   weight_decay: float = 0.0,
                   clip_norm: Optional[float] = None,
                   b1: float = 0.9,
                   b2: float = 0.999,
                   eps: float = 1e-8,
                   multiply_by_parameter_scale: bool = False,
                   decay_rate: float = 0.8,
                   clipping_threshold: Optional[float] = 1.0,
                   min_dim_size_to_factor: int = 128) -> optax.GradientTransformation:
  """An optax transformation over the whole parameter tree.

  Args:
    name: 'adafactor' (T5X-style, see `_base_optimizer`) or 'adamw'.
    schedule: a step -> lr function (`make_schedule`) or a constant float.
    params: the parameter tree (concrete or abstract); only its structure and
      paths are used, to build the freeze labels.
    freeze: which parameters train ('all' | 'conditioning' | 'prompts').
    weight_decay: decoupled weight decay (AdamW's, or Adafactor's
      weight_decay_rate), multiplied by the learning rate.
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
      multiply_by_parameter_scale=multiply_by_parameter_scale,
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
