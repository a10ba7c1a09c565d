"""The project's network as a google-research/t5x model: train, eval, infer under T5X.

`HyperPromptEncoderDecoderModel` subclasses `t5x.models.EncoderDecoderModel`
for `network.Transformer` and carries each example's task id (batch feature
`task_ids`, [batch] or [batch, 1] int32) through initialisation, the loss,
scoring and decoding (T5X's `decoding.beam_search` / `temperature_sample`; for
beams or several samples the ids are expanded like the encoder outputs, with
`decoding.flat_batch_beam_expand`). A packed batch (seqio's segment ids and
positions, one task per row: docs/PACKING.md) reaches the network as T5X
passes it to its own; decoding takes unpacked batches, as in T5X.

Also the T5X-side configuration helpers the gin files in `gin/t5x/` name:
partitioning rules and Adafactor factor rules for the conditioning's logical
axes, a restore transformation that checks a checkpoint fits the model, and
`HyperPromptCheckpointManager`, T5X's orbax checkpoint manager that also
restores checkpoints of this project's trainer (`python -m t5x.eval` / `infer`
on `hyperprompt-t5x train`'s MODEL_DIR/checkpoint_<step>). Importing this
module (the gin files do) makes bad input under T5X's entry points one
`error: ...` line: a required gin macro left unset, a checkpoint that does not
fit the model.

This is the only module that imports t5x; nothing else in the package imports
it (tests/t5x_adapter/test_t5x_model.py checks), so the rest works without T5X.
"""
from __future__ import annotations

import functools
import itertools
import os
import re
import sys
from typing import Any, Mapping, Optional, Sequence, Tuple

from absl import app as absl_app
from absl import flags as absl_flags
from absl import logging
import flax
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
from t5x import adafactor
from t5x import checkpoints as t5x_checkpoints
from t5x import decoding as t5x_decoding
from t5x import models as t5x_models
from t5x import partitioning as t5x_partitioning
from t5x import state_utils

from hyperprompt_t5x.model import decoding
from hyperprompt_t5x.model import models
from hyperprompt_t5x import optim
from hyperprompt_t5x.model import network
from hyperprompt_t5x.model.methods import HYPERPROMPT_METHODS
from hyperprompt_t5x import partitioning
from hyperprompt_t5x.training import prompt_scale
from hyperprompt_t5x.training import train_data
from hyperprompt_t5x.run import run_setup
from hyperprompt_t5x.checkpoints import t5x_format
from hyperprompt_t5x.checkpoints import t5x_run_store
from hyperprompt_t5x.checkpoints import pretrained, step_dirs, tree_check
from hyperprompt_t5x.checkpoints.errors import CheckpointError

PyTree = Any
TASK_IDS = 'task_ids'


def _feature_converter_cls(config: network.T5Config):
  """The tasks' converter; packed rows reserve prompt tuning's prompt positions."""
  from hyperprompt_t5x.tasks import feature_converter  # seqio + TF, like T5X itself
  return functools.partial(feature_converter.TaskIdEncDecFeatureConverter,
                           prompt_positions=train_data.prompt_positions(config),
                           num_tasks=config.num_tasks)


class HyperPromptEncoderDecoderModel(t5x_models.EncoderDecoderModel):
  """`t5x.models.EncoderDecoderModel` for `network.Transformer` with task ids.

  Constructed like T5X's (gin: `module = @network.Transformer()`, vocabularies,
  `optimizer_def`, `decode_fn`, losses); the feature converter defaults to
  the tasks' `TaskIdEncDecFeatureConverter` (emits `task_ids`; with T5X's
  `utils.DatasetConfig.pack` it packs one task per row, docs/PACKING.md).
  """

  def __init__(self, module: network.Transformer, *args, feature_converter_cls=None,
               **kwargs):
    if not isinstance(module, network.Transformer):
      raise TypeError(f'HyperPromptEncoderDecoderModel needs a hyperprompt_t5x.model.network.'
                      f'Transformer module, got {type(module).__name__}')
    super().__init__(module, *args,
                     feature_converter_cls=feature_converter_cls or _feature_converter_cls(module.config),
                     **kwargs)
    # Before T5X builds or restores anything: the ids must fit the embedding rows.
    run_setup.check_vocabulary_fits(self.output_vocabulary.vocab_size,
                                    module.config.vocab_size, 'this T5X run (gin VOCABULARY)')

  @property
  def config(self) -> network.T5Config:
    return self.module.config

  # -- batch features ----------------------------------------------------------

  def _task_ids(self, batch: Mapping[str, jnp.ndarray]) -> Optional[jnp.ndarray]:
    """batch['task_ids'] [batch] or [batch, 1] -> [batch] int32 (None if absent)."""
    task_ids = batch.get(TASK_IDS)
    if task_ids is None:
      cfg = self.config
      if cfg.conditioned and cfg.num_tasks > 1:
        raise ValueError(
            f'the batch has no "{TASK_IDS}" feature but method={cfg.method!r} with '
            f'num_tasks={cfg.num_tasks} needs one: use the hyperprompt_t5x.tasks tasks '
            '(each emits "task_id") and TaskIdEncDecFeatureConverter')
      return None
    if task_ids.ndim == 2:
      if task_ids.shape[1] != 1:
        raise ValueError(f'{TASK_IDS} must be [batch] or [batch, 1], got {task_ids.shape}')
      task_ids = task_ids[:, 0]
    return task_ids.astype(jnp.int32)

  # -- initialisation ------------------------------------------------------------

  def get_initial_variables(self, rng: jax.Array, input_shapes: Mapping[str, Any],
                            input_types: Optional[Mapping[str, Any]] = None):
    """{'params', 'params_axes'} of the network; shapes from T5X's input_shapes
    (with the packing features where it names them, as T5X's init)."""
    input_types = input_types or {}
    batch = input_shapes['encoder_input_tokens'][0]
    # [batch, input_len], [batch, target_len] dummies (and packing features); [batch] ids.
    enc, dec = (jnp.ones(input_shapes[k], input_types.get(k, jnp.int32))
                for k in ('encoder_input_tokens', 'decoder_input_tokens'))
    # Packing dummies: all-padding rows (segment ids 0), valid for every method.
    packing = {k: jnp.zeros(input_shapes[k], input_types.get(k, jnp.int32))
               for k in network.PACKING_FEATURES if k in input_shapes}
    return flax.core.freeze(self.module.init(
        rng, enc, dec, dec, jnp.zeros((batch,), jnp.int32), **packing, enable_dropout=False))

  # -- forward / loss / scores -------------------------------------------------

  def _compute_logits(self, params: PyTree, batch: Mapping[str, jnp.ndarray],
                      dropout_rng: Optional[jax.Array] = None, mutable=False,
                      other_variables: Optional[PyTree] = None):
    """Teacher-forced logits [batch, target_len, vocab] (T5X's loss and score_batch)."""
    rngs = {'dropout': dropout_rng} if dropout_rng is not None else None
    return self.module.apply(
        {'params': params, **(other_variables or {})},
        batch['encoder_input_tokens'], batch['decoder_input_tokens'],
        batch['decoder_target_tokens'], self._task_ids(batch), **models.packing_features(batch),
        enable_dropout=rngs is not None, rngs=rngs, mutable=mutable)

  # -- decoding -------------------------------------------------------------------

  def _compute_logits_from_slice(self, decoding_state, params: PyTree, encoded_inputs,
                                 raw_inputs, max_decode_length: int, task_ids=None):
    """One cached step: cur_token [batch * beams, 1] -> logits [batch * beams, vocab]."""
    flat_ids = decoding_state.cur_token
    logits, new_vars = self.module.apply(
        {'params': params, 'cache': decoding_state.cache}, encoded_inputs, raw_inputs,
        flat_ids, flat_ids, task_ids, enable_dropout=False, decode=True,
        max_decode_length=max_decode_length, mutable=['cache'], method=self.module.decode)
    # [batch * beams, 1, vocab] -> [batch * beams, vocab]
    return jnp.squeeze(logits, axis=1), new_vars['cache']

  def predict_batch_with_aux(self, params: PyTree, batch: Mapping[str, jnp.ndarray],
                             rng: Optional[jax.Array] = None,
                             decoder_params: Optional[dict] = None,
                             return_all_decodes: Optional[bool] = None,
                             num_decodes: Optional[int] = None,
                             prompt_with_targets: bool = False
                             ) -> Tuple[jnp.ndarray, Mapping[str, jnp.ndarray]]:
    """T5X's decode_fn (beam search by default) over the task-conditioned decoder.

    Returns (decodes [batch, len], {'scores': [batch]}), or with
    return_all_decodes [batch, num_decodes, len] and [batch, num_decodes].
    """
    if prompt_with_targets:
      raise ValueError('prompt_with_targets is not supported by HyperPrompt models')
    if models.packing_features(batch):
      raise ValueError(f'packed batch ({sorted(models.packing_features(batch))}): decoding '
                       'takes unpacked batches (utils.DatasetConfig.pack = False for infer)')
    if return_all_decodes is None:
      return_all_decodes = self._default_decoder_params.return_all_decodes
    if num_decodes is None:
      num_decodes = self._default_decoder_params.num_decodes
    encoder_input_tokens = batch['encoder_input_tokens']
    decoder_input_tokens = batch['decoder_input_tokens']
    batch_size, max_decode_length = decoder_input_tokens.shape
    task_ids = self._task_ids(batch)
    if task_ids is None:
      task_ids = jnp.zeros((batch_size,), jnp.int32)
    # [batch, input_len] -> [batch, input_len (+ l for prompt tuning), emb]
    encoded = self.module.apply({'params': params}, encoder_input_tokens, task_ids,
                                enable_dropout=False, method=self.module.encode)
    cache = decoding.init_cache(self.config, params, encoded, encoder_input_tokens,
                                task_ids, max_decode_length)
    expand = functools.partial(t5x_decoding.flat_batch_beam_expand, beam_size=num_decodes)
    tokens_to_logits = functools.partial(
        self._compute_logits_from_slice, params=params,
        encoded_inputs=expand(encoded),            # [batch * beams, in_len, emb]
        raw_inputs=expand(encoder_input_tokens),   # [batch * beams, in_len]
        max_decode_length=max_decode_length,
        task_ids=expand(task_ids))                 # [batch * beams]
    decoder_params = dict(decoder_params or {})
    if rng is not None:
      if decoder_params.get('decode_rng') is not None:
        raise ValueError('got an RNG both as `rng` and as decoder_params["decode_rng"]')
      decoder_params['decode_rng'] = rng
    decoder_params.setdefault('eos_id', self.output_vocabulary.eos_id or 1)
    # decodes [batch, num_decodes, len], scores [batch, num_decodes] (best last).
    decodes, scores = self._decode_fn(
        inputs=jnp.zeros_like(decoder_input_tokens), cache=cache,
        tokens_to_logits=tokens_to_logits, num_decodes=num_decodes, **decoder_params)
    if return_all_decodes:
      return decodes, {'scores': scores}
    return decodes[:, -1, :], {'scores': scores[:, -1]}


# -- step 0 of a fine-tuning run: prompt scale -------------------------------------

def prompt_scale_trainer(*, trainer_cls, initial_checkpoint_path: Optional[str] = None,
                         calibrate_prompt_scale: bool = True, **kwargs):
  """T5X's `train.trainer_cls` for fine-tuning (gin/t5x/finetune.gin): `trainer_cls(**kwargs)`
  whose first `train` call starts with the lean trainer's step 0 on a restored backbone.

  When this run starts from `initial_checkpoint_path` (INITIAL_CHECKPOINT_PATH:
  the state's step is that checkpoint_<step>'s, or, for a name without a
  step, MODEL_DIR holds no checkpoint yet), the prompt/real key-value norm
  ratios of the first batch are logged and, unless `calibrate_prompt_scale`
  is False (CALIBRATE_PROMPT_SCALE), brought to 1 (prompt_scale.py); that
  batch is then trained on as usual. T5X's checkpoint before the loop holds
  the uncalibrated state at that same step, so a resume from it calibrates
  again, alike (for a checkpoint name without a step, it does not).
  """
  run_setup.require('calibrate_prompt_scale', calibrate_prompt_scale, bool)
  trainer = trainer_cls(**kwargs)
  model = kwargs['model']
  if (not initial_checkpoint_path or not isinstance(model, HyperPromptEncoderDecoderModel)
      or model.config.method not in HYPERPROMPT_METHODS):
    return trainer
  step = int(np.asarray(jax.device_get(trainer.train_state.step)))
  named_step = step_dirs.step_of(initial_checkpoint_path)
  if named_step is not None:
    fresh = step == named_step
  else:  # not named checkpoint_<step>
    fresh = not t5x_checkpoints.all_steps(os.fspath(kwargs['summary_dir']))
  if not fresh:
    return trainer
  train = trainer.train

  def train_calibrating_first(batch_iter, num_steps, start_step=None):
    trainer.train = train  # once
    batch_iter = iter(batch_iter)
    first = next(batch_iter)
    batch = dict(first)
    batch[TASK_IDS] = model._task_ids(batch)  # pylint: disable=protected-access
    partitioner = kwargs['partitioner']
    if jax.process_count() > 1:
      batch = t5x_partitioning.host_local_array_to_global_array(
          batch, partitioner.mesh, partitioner.data_partition_spec)
    params = flax.core.unfreeze(trainer.train_state.params)
    # Every process measures the global batch, so all compute the same parameters.
    params, message = prompt_scale.calibrate_first_batch(
        model.config, params, batch, calibrate_prompt_scale)
    if jax.process_index() == 0:
      logging.info('%s', message)
    trainer.train_state = trainer.train_state.replace_params(
        flax.core.freeze(params) if isinstance(trainer.train_state.params, flax.core.FrozenDict)
        else params)
    return train(itertools.chain([first], batch_iter), num_steps, start_step)

  trainer.train = train_calibrating_first
  return trainer


# -- T5X-side configuration (named in gin/t5x/*.gin) ------------------------------

def conditioning_axis_rules() -> list:
  """Logical -> mesh rules for the conditioning axes (all replicated), for
  `t5x.partitioning.standard_logical_axis_rules.additional_rules`."""
  return [(name, None) for name in partitioning.CONDITIONING_AXES]


def logical_factor_rules() -> flax.core.FrozenDict:
  """T5X's Adafactor factor rules for every logical axis of the network, the
  conditioning axes included (`optim.LOGICAL_FACTOR_RULES`, the lean trainer's):
  T5X's `Adafactor.set_param_axes` raises KeyError on an axis without a rule."""
  return flax.core.freeze({name: adafactor.factor_name_to_factordim(kind)
                           for name, kind in optim.LOGICAL_FACTOR_RULES.items()})


def check_checkpoint_fits(state_dict: Mapping[str, Any], target_state_dict=None,
                          is_resuming: bool = False) -> Mapping[str, Any]:
  """T5X restore transformation that only checks: the checkpoint fits this model.

  The checkpoint's parameter names (and shapes, where its leaves carry them:
  a project checkpoint's do) must be the model's (a checkpoint without any
  task conditioning, e.g. T5 1.1's, may leave it to the initialisation); else
  one CheckpointError names the difference instead of T5X's restore failing
  deep inside orbax. A project checkpoint reaches this check in T5X's layout
  through `HyperPromptCheckpointManager`; in its own layout ({step, params,
  opt_state}) through T5X's default manager (t5x.train, or an eval / infer gin
  without project_checkpoint.gin), which cannot read it: refused with one line.
  """
  del is_resuming
  if 'params' in state_dict and 'target' not in state_dict:
    raise CheckpointError(
        'this is a hyperprompt_t5x trainer checkpoint ({step, params, opt_state}); T5X\'s '
        'own checkpoint manager reads only {target, state}: for t5x.eval / t5x.infer add '
        '--gin_file=hyperprompt_t5x/gin/t5x/project_checkpoint.gin (demo_eval.gin and '
        'demo_infer.gin include it), or evaluate it with `hyperprompt-t5x eval`')
  if target_state_dict is not None and 'target' in state_dict:
    _check_checkpoint_params(state_dict['target'], target_state_dict['target'])
  return state_dict


def _check_checkpoint_params(have_tree, want_tree) -> None:
  have = flax.core.unfreeze(have_tree)
  want = dict(flax.core.unfreeze(want_tree))
  flat_have, flat_want = (traverse_util.flatten_dict(t, sep='/') for t in (have, want))
  if all(_shape(tree.get(pretrained.EMBEDDING)) for tree in (flat_have, flat_want)):
    pretrained.check_embedding_rows(flat_have, flat_want, 'the checkpoint does not fit this model')
  if network.CONDITIONING_KEY not in have:  # a backbone checkpoint: fresh conditioning
    want.pop(network.CONDITIONING_KEY, None)
  tree_check.check_fits(have, want, 'the checkpoint', with_dtype=False,
                        hint=' (another method, size or number of tasks?)')


def _shape(leaf) -> Optional[tuple]:
  shape = getattr(leaf, 'shape', None)
  return tuple(shape) if isinstance(shape, (tuple, list)) else None


# -- project checkpoints under T5X ----------------------------------------------

class HyperPromptCheckpointManager(t5x_checkpoints.OrbaxCheckpointManagerInterface):
  """T5X's orbax checkpoint manager that also restores `hyperprompt-t5x train` checkpoints.

  Bound for `utils.RestoreCheckpointConfig` in gin/t5x/project_checkpoint.gin
  (eval and infer; T5X train's resume insists on T5X's default manager). A project checkpoint
  (orbax item `state/` = {step, params, opt_state}) is read by the project's
  reader and restored as T5X's state dict {target: params, state: {step,
  param_states}}: the restore transformations and fallback state apply as in
  T5X's restore, the arrays are placed with T5X's partitioning. The optimizer
  slots come over when the project trained with Adafactor (its slots are T5X's,
  optim.ScaleByT5XAdafactorState); otherwise T5X's optimizer state starts fresh
  (logged). Everything else, saving included, is T5X's own.
  """

  def restore(self, step: Optional[int] = None, path: Optional[str] = None,
              fallback_state: Optional[Mapping[str, Any]] = None,
              state_transformation_fns: Sequence[Any] = (),
              lazy_parameters: Optional[bool] = False):
    step_dir = (os.fspath(path) if path is not None else
                step_dirs.path(self.directory, step)
                if step is not None else None)
    try:
      if step_dir is None or not t5x_run_store.is_project_checkpoint(step_dir):
        return super().restore(step=step, path=path, fallback_state=fallback_state,
                               state_transformation_fns=state_transformation_fns,
                               lazy_parameters=lazy_parameters)
      return self._restore_project(step_dir, fallback_state, state_transformation_fns)
    except CheckpointError as e:  # gin adds lines to it: keep the first, name the checkpoint
      message = str(e).splitlines()[0]
      raise CheckpointError(message if message.startswith(f'{step_dir}:')
                            else f'{step_dir}: {message}') from e

  def _restore_project(self, step_dir: str, fallback_state, state_transformation_fns):
    target = self._train_state.state_dict()  # jax.ShapeDtypeStruct leaves
    state_dict = project_state_dict(step_dir, target)
    for fn in state_transformation_fns:
      state_dict = fn(state_dict, target)
    state_dict = state_utils.intersect_state(state_dict, target)
    if fallback_state is not None:
      state_dict = state_utils.merge_state(state_dict, fallback_state)
    return self._train_state.restore_state(self._place(state_dict, target, step_dir))

  def _place(self, state_dict, target, source: str):
    """Host arrays -> jax.Arrays sharded by T5X's partitioning of the train state."""
    mesh_axes = traverse_util.flatten_dict(
        self._partitioner.get_mesh_axes(self._train_state).state_dict())
    want = traverse_util.flatten_dict(target)
    placed = {}
    for key, value in traverse_util.flatten_dict(state_dict).items():
      dtype = (self._restore_dtype if key[0] == 'target' and self._restore_dtype is not None
               else want[key].dtype)
      array = np.asarray(value).astype(jnp.dtype(dtype))
      if array.shape != tuple(want[key].shape):
        raise CheckpointError(
            f'{source}: {"/".join(map(str, key))} has shape {array.shape}, the model '
            f'{tuple(want[key].shape)} (a checkpoint of another method, size or number of '
            'tasks?)')
      sharding = jax.sharding.NamedSharding(
          self._partitioner.mesh, mesh_axes.get(key) or jax.sharding.PartitionSpec())
      placed[key] = jax.make_array_from_callback(array.shape, sharding,
                                                 lambda index, a=array: a[index])
    return traverse_util.unflatten_dict(placed)


def project_state_dict(step_dir: str, target: Mapping[str, Any]) -> dict:
  """A project checkpoint as T5X's state dict {target, state: {step[, param_states]}}.

  `target`: T5X's train-state dict of the model; param_states (absent for
  eval / infer, whose train state has no optimizer) take its shapes. Host
  numpy leaves; the step is the directory's, as T5X reads it.
  """
  params, adafactor_state = t5x_format.load_params_and_optimizer_state(step_dir)
  step = step_dirs.require_step(step_dir)
  state = {'step': np.asarray(step, np.int32)}
  if 'param_states' in target['state']:
    state['param_states'] = _t5x_param_states(
        target['state']['param_states'],
        adafactor_state.param_states if adafactor_state is not None else {}, step_dir)
  return {'target': params, 'state': state}


def _t5x_param_states(want_tree, saved: Mapping[str, Mapping[str, Any]], source: str):
  """T5X's param_states (shapes of `want_tree`) from the project's Adafactor slots
  ({'encoder/.../kernel': {'v_row', 'v_col', 'v'}}), or zeros when they do not fit."""
  want = traverse_util.flatten_dict(flax.core.unfreeze(want_tree))

  def saved_slot(key, leaf):
    value = saved.get('/'.join(map(str, key[:-1])), {}).get(key[-1])
    return value if value is not None and np.shape(value) == tuple(leaf.shape) else None

  slots = {key: saved_slot(key, leaf) for key, leaf in want.items()}
  if want and all(v is not None for k, v in slots.items() if k[-1] == 'v'):
    logging.info('%s: its Adafactor slots restored into T5X\'s optimizer state', source)
  else:
    slots = {}
    logging.info('%s: T5X\'s optimizer state starts fresh (the checkpoint holds no '
                 'Adafactor state of its shapes)', source)
  return traverse_util.unflatten_dict({
      key: slots[key] if slots.get(key) is not None else np.zeros(leaf.shape, leaf.dtype)
      for key, leaf in want.items()})


# -- bad input under T5X's entry points: one line ------------------------------

_UNSET_GIN = re.compile(r'(\S+?)(/macro\.value)? set to `%gin\.REQUIRED` but not subsequently '
                        r'overridden')
_UNBOUND_GIN = re.compile(r'Required bindings for `(\S+)` not provided in config: \[(.*)\]')


def one_line_error(exc: BaseException) -> Optional[str]:
  """The one line for a known bad input under T5X (gin REQUIRED unset, a checkpoint
  that does not fit), naming what and where; None for anything else."""
  if isinstance(exc, (CheckpointError, run_setup.VocabularySizeError)):
    return str(exc).splitlines()[0]
  text = str(exc).splitlines()[0] if str(exc) else ''
  unset, unbound = _UNSET_GIN.match(text), _UNBOUND_GIN.match(text)
  if unset:
    kind = 'macro' if unset.group(2) else 'binding'
    names = [unset.group(1)]
  elif unbound:
    kind = 'binding'
    names = [f'{unbound.group(1)}.{n.strip(" ")[1:-1]}' for n in unbound.group(2).split(',')]
  else:
    return None
  flags = ' '.join(f'--gin.{n}=...' for n in names)
  verb = 'is' if len(names) == 1 else 'are'
  return (f'required gin {kind}{"s" * (len(names) > 1)} {", ".join(names)} {verb} not set '
          f'(gin files: {", ".join(_gin_files()) or "none"}): add {flags}')


def _gin_files() -> list:
  try:
    return list(absl_flags.FLAGS['gin_file'].value or [])
  except (KeyError, absl_flags.Error):  # not a T5X entry point, or flags unparsed
    return []


class _OneLineErrors(absl_app.ExceptionHandler):
  """absl calls it for an exception leaving T5X's main, before printing its
  traceback; exits 2 after one line. (os._exit: absl swallows a SystemExit
  raised here and re-raises the original exception.)"""

  def wants(self, exc):
    return one_line_error(exc) is not None

  def handle(self, exc):
    print(f'error: {one_line_error(exc)}', file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(2)  # pylint: disable=protected-access


if not any(isinstance(h, _OneLineErrors) for h in absl_app.EXCEPTION_HANDLERS):
  absl_app.install_exception_handler(_OneLineErrors())
