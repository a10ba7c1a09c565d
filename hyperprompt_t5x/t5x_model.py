"""The project's network as a google-research/t5x model: train, eval, infer under T5X.

`HyperPromptEncoderDecoderModel` subclasses `t5x.models.EncoderDecoderModel`
for `network.Transformer` and carries each example's task id (batch feature
`task_ids`, [batch] or [batch, 1] int32) through initialisation, the loss,
scoring and decoding (T5X's `decoding.beam_search` / `temperature_sample`; for
beams or several samples the ids are expanded like the encoder outputs, with
`decoding.flat_batch_beam_expand`). T5X calls the module with packing keyword
arguments (segment ids, positions) the network does not take: rows are never
packed here (a packed row would mix tasks), so a packed batch is refused.

Also the T5X-side configuration helpers the gin files in `gin/t5x/` name:
partitioning rules and Adafactor factor rules for the conditioning's logical
axes, and a restore transformation that checks a checkpoint fits the model.

This is the only module that imports t5x; nothing else in the package imports
it (tests/test_t5x_model.py checks), so the rest works without T5X.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping, Optional, Tuple

import flax
from flax import traverse_util
import jax
import jax.numpy as jnp
from t5x import adafactor
from t5x import decoding as t5x_decoding
from t5x import models as t5x_models

from hyperprompt_t5x import decoding
from hyperprompt_t5x import optim
from hyperprompt_t5x import network
from hyperprompt_t5x import partitioning
from hyperprompt_t5x.checkpoints import CheckpointError

PyTree = Any
TASK_IDS = 'task_ids'


def _feature_converter_cls():
  from hyperprompt_t5x.tasks import feature_converter  # seqio + TF, like T5X itself
  return feature_converter.TaskIdEncDecFeatureConverter


class HyperPromptEncoderDecoderModel(t5x_models.EncoderDecoderModel):
  """`t5x.models.EncoderDecoderModel` for `network.Transformer` with task ids.

  Constructed like T5X's (gin: `module = @network.Transformer()`, vocabularies,
  `optimizer_def`, `decode_fn`, losses); the feature converter defaults to
  the tasks' `TaskIdEncDecFeatureConverter` (unpacked, emits `task_ids`).
  """

  def __init__(self, module: network.Transformer, *args, feature_converter_cls=None,
               **kwargs):
    if not isinstance(module, network.Transformer):
      raise TypeError(f'HyperPromptEncoderDecoderModel needs a hyperprompt_t5x.network.'
                      f'Transformer module, got {type(module).__name__}')
    super().__init__(module, *args,
                     feature_converter_cls=feature_converter_cls or _feature_converter_cls(),
                     **kwargs)

  @property
  def config(self) -> network.T5Config:
    return self.module.config

  # -- batch features ----------------------------------------------------------

  def _task_ids(self, batch: Mapping[str, jnp.ndarray]) -> Optional[jnp.ndarray]:
    """batch['task_ids'] [batch] or [batch, 1] -> [batch] int32 (None if absent)."""
    packed = sorted(k for k in batch if k.endswith(('_segment_ids', '_positions')))
    if packed:
      raise ValueError(
          f'packed batch (features {packed}): HyperPrompt rows must not be packed, a '
          'packed row would mix tasks; set utils.DatasetConfig.pack = False')
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
    """{'params', 'params_axes'} of the network; shapes from T5X's input_shapes."""
    input_types = input_types or {}
    batch = input_shapes['encoder_input_tokens'][0]
    # [batch, input_len], [batch, target_len] dummies; [batch] task ids.
    enc = jnp.ones(input_shapes['encoder_input_tokens'],
                   input_types.get('encoder_input_tokens', jnp.int32))
    dec = jnp.ones(input_shapes['decoder_input_tokens'],
                   input_types.get('decoder_input_tokens', jnp.int32))
    return flax.core.freeze(self.module.init(
        rng, enc, dec, dec, jnp.zeros((batch,), jnp.int32), enable_dropout=False))

  # -- forward / loss / scores -------------------------------------------------

  def _compute_logits(self, params: PyTree, batch: Mapping[str, jnp.ndarray],
                      dropout_rng: Optional[jax.Array] = None, mutable=False,
                      other_variables: Optional[PyTree] = None):
    """Teacher-forced logits [batch, target_len, vocab] (T5X's loss and score_batch)."""
    rngs = {'dropout': dropout_rng} if dropout_rng is not None else None
    return self.module.apply(
        {'params': params, **(other_variables or {})},
        batch['encoder_input_tokens'], batch['decoder_input_tokens'],
        batch['decoder_target_tokens'], self._task_ids(batch),
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


def _param_paths(tree: Mapping[str, Any]) -> set:
  return set(traverse_util.flatten_dict(flax.core.unfreeze(tree), sep='/'))


def check_checkpoint_fits(state_dict: Mapping[str, Any], target_state_dict=None,
                          is_resuming: bool = False) -> Mapping[str, Any]:
  """T5X restore transformation that only checks: the checkpoint fits this model.

  The checkpoint's parameter names must be the model's (a checkpoint without
  any task conditioning, e.g. T5 1.1's, may leave it to the initialisation);
  else one CheckpointError names the difference instead of T5X's restore
  failing deep inside orbax. This project's own checkpoints
  ({step, params, opt_state}) are refused with one line: T5X's orbax restore
  looks leaves up by their T5X names (`target.*`), so it cannot read them in
  place (renaming through orbax placeholders fails in T5X at cc342d4).
  """
  del is_resuming
  if 'params' in state_dict and 'target' not in state_dict:
    raise CheckpointError(
        'this is a hyperprompt_t5x trainer checkpoint ({step, params, opt_state}); T5X '
        'reads only its own layout {target, state}: evaluate it with `hyperprompt-t5x '
        'eval` (T5X cannot restore it yet)')
  if target_state_dict is not None and 'target' in state_dict:
    _check_checkpoint_params(state_dict['target'], target_state_dict['target'])
  return state_dict


def _check_checkpoint_params(have_tree, want_tree) -> None:
  have, want = _param_paths(have_tree), _param_paths(want_tree)
  key = network.CONDITIONING_KEY + '/'
  if not any(p.startswith(key) for p in have):  # a backbone checkpoint: fresh conditioning
    want = {p for p in want if not p.startswith(key)}
  missing, unexpected = sorted(want - have), sorted(have - want)
  if missing or unexpected:
    raise CheckpointError(
        'the checkpoint does not fit this model (another method, size or number of tasks?): '
        f'{len(missing)} parameter(s) missing, e.g. {missing[:3]}; {len(unexpected)} '
        f'unexpected, e.g. {unexpected[:3]}')
