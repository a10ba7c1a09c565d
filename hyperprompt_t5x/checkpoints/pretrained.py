"""Pretrained T5 1.1 weights into the T5X parameter tree (public entry).

Readers and one merge, all producing / consuming the backbone of the parameter
tree of docs/METHODS.md (`token_embedder`, `encoder`, `decoder`) as nested dicts
of float32 numpy arrays:

* `load_t5x_params(path)` (t5x_format.py): a T5X checkpoint, i.e. the
  msgpack file `checkpoint_N/checkpoint` whose small arrays are inline and
  whose large ones are TensorStore zarr specs relative to the checkpoint
  directory (local or `gs://`); also orbax PyTree checkpoints (newer T5X, this
  project's trainer).
* `load_hf_t5(directory)` (hf_format.py): a Hugging Face
  `T5ForConditionalGeneration` directory (config.json + safetensors, single
  file or sharded).
* `merge_backbone(fresh, pretrained)`: backbone from the checkpoint, every
  task-conditioning parameter (top-level `task_conditioning`) from the fresh
  initialisation; one `CheckpointError` lists every mismatch.
* `load_pretrained(path, config)`: detects the format and does all of it
  (the trainer's INITIAL_CHECKPOINT_PATH).
* `load_optimizer_state(path)`: the Adafactor state and step the checkpoint
  holds (T5X's `state/param_states`, this project's TrainState), or None.

Uses numpy, msgpack (via flax.serialization), tensorstore, orbax and
safetensors (lazily); no TensorFlow.
"""
import logging
import os
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import numpy as np

from hyperprompt_t5x.checkpoints import tree_check

from hyperprompt_t5x.checkpoints.hf_format import hf_t5_to_t5x
from hyperprompt_t5x.checkpoints.hf_format import is_hf_t5_directory
from hyperprompt_t5x.checkpoints.hf_format import load_hf_t5
from hyperprompt_t5x.checkpoints.trees import to_plain_dict
from hyperprompt_t5x.checkpoints.t5x_format import absolute_ts_spec
from hyperprompt_t5x.checkpoints.t5x_format import adafactor_state_from_t5x
from hyperprompt_t5x.checkpoints.t5x_format import AdafactorCheckpointState
from hyperprompt_t5x.checkpoints.t5x_format import BACKBONE_KEYS
from hyperprompt_t5x.checkpoints.errors import CheckpointError
from hyperprompt_t5x.checkpoints.trees import flatten_params
from hyperprompt_t5x.checkpoints.t5x_format import load_t5x_optimizer_state
from hyperprompt_t5x.checkpoints.t5x_format import load_t5x_params
from hyperprompt_t5x.checkpoints.t5x_format import t5x_config_from_params
from hyperprompt_t5x.checkpoints.trees import unflatten_params
from hyperprompt_t5x.model import network
from hyperprompt_t5x.model.network import CONDITIONING_KEY

Params = Dict[str, Any]



# ----------------------------------------------------------------------------
# Merging a pretrained backbone into fresh params.
# ----------------------------------------------------------------------------


def merge_backbone(fresh_params: Mapping[str, Any],
                   pretrained_backbone: Mapping[str, Any], *,
                   source: str = '<checkpoint>') -> Params:
  """Backbone from the checkpoint, task conditioning from the fresh init.

  Args:
    fresh_params: the model's freshly initialised params (optionally wrapped in
      {'params': ...}); its tree is the reference.
    pretrained_backbone: the checkpoint's tree (T5X names). A
      `task_conditioning` subtree in it is ignored: conditioning always starts
      from `fresh_params`.
    source: where the checkpoint came from, for error messages.

  Returns:
    A tree shaped like `fresh_params` (same wrapping), backbone leaves from
    the checkpoint cast to the fresh leaves' dtypes.

  Raises:
    CheckpointError: listing every backbone param missing from the checkpoint
      or of the wrong shape, and every unexpected checkpoint param.
  """
  fresh = to_plain_dict(fresh_params)
  wrapped = set(fresh) == {'params'}
  if wrapped:
    fresh = fresh['params']
  pretrained = to_plain_dict(pretrained_backbone)
  if set(pretrained) == {'params'}:
    pretrained = pretrained['params']

  want = flatten_params({k: v for k, v in fresh.items() if k != CONDITIONING_KEY})
  have = flatten_params({k: v for k, v in pretrained.items() if k != CONDITIONING_KEY})
  if CONDITIONING_KEY in pretrained:
    logging.info('%s: ignoring its %s params (conditioning starts fresh).',
                 source, CONDITIONING_KEY)
  check_embedding_rows(have, want, source)
  tree_check.check_fits(unflatten_params(have), unflatten_params(want),
                        f'{source}: checkpoint', with_dtype=False, hint=' backbone')

  merged = unflatten_params({
      n: np.asarray(have[n], dtype=_dtype_of(want[n])) for n in want})
  if CONDITIONING_KEY in fresh:
    merged[CONDITIONING_KEY] = fresh[CONDITIONING_KEY]
  # Keep the fresh tree's key order (cosmetic; flax does not care).
  merged = {k: merged[k] for k in fresh if k in merged}
  return {'params': merged} if wrapped else merged


EMBEDDING = 'token_embedder/embedding'


def check_embedding_rows(have: Mapping[str, Any], want: Mapping[str, Any], source: str) -> None:
  """One line when the checkpoint's embedding rows (its vocab_size) are not the model's."""
  if EMBEDDING not in have or EMBEDDING not in want:
    return
  rows, model_rows = np.shape(have[EMBEDDING])[0], np.shape(want[EMBEDDING])[0]
  if rows != model_rows:
    raise CheckpointError(
        f'{source}: {rows} embedding rows in the checkpoint, {model_rows} in the model '
        f'(T5Config.vocab_size = {model_rows}); set T5Config.vocab_size = {rows} to '
        'fine-tune it (the vocabulary may have fewer ids than the rows)')


def _dtype_of(leaf: Any):
  dtype = getattr(leaf, 'dtype', None)
  return dtype if dtype is not None else np.float32


def split_backbone(params: Mapping[str, Any]) -> Tuple[Params, Params]:
  """params -> (backbone tree, conditioning tree or {})."""
  params = to_plain_dict(params)
  backbone = {k: v for k, v in params.items() if k != CONDITIONING_KEY}
  return backbone, params.get(CONDITIONING_KEY, {})


# ----------------------------------------------------------------------------
# One entry for the trainer.
# ----------------------------------------------------------------------------


def load_backbone(path: str) -> Params:
  """T5X checkpoint or Hugging Face directory -> T5X-named backbone tree."""
  path = os.fspath(path)
  if is_hf_t5_directory(path):
    return load_hf_t5(path)[1]
  return load_t5x_params(path)


def load_optimizer_state(path: str) -> Optional[AdafactorCheckpointState]:
  """The Adafactor state and step in a checkpoint; None for a Hugging Face
  directory or a checkpoint without one (an AdamW TrainState)."""
  path = os.fspath(path)
  if is_hf_t5_directory(path):
    return None
  return load_t5x_optimizer_state(path)


def load_pretrained(path: str, config, fresh_params: Optional[Mapping[str, Any]] = None,
                    *, seed: int = 0) -> Params:
  """INITIAL_CHECKPOINT_PATH -> full params for `config`.

  Reads the backbone (T5X checkpoint dir/file, or a Hugging Face T5 directory),
  then merges it into `fresh_params` (or a fresh `Transformer(config)` init
  from `seed`), so task conditioning starts from its initialisation.

  Raises:
    CheckpointError: unreadable checkpoint, or one that does not fit `config`.
  """
  if is_hf_t5_directory(os.fspath(path)):
    hf_config, backbone = load_hf_t5(os.fspath(path))
    if hf_config.vocab_size != config.vocab_size:
      raise CheckpointError(
          f'{os.fspath(path)}: its config.json has vocab_size {hf_config.vocab_size}, the '
          f'model {config.vocab_size} (T5Config.vocab_size); set T5Config.vocab_size = '
          f'{hf_config.vocab_size} to fine-tune it')
  else:
    backbone = load_t5x_params(os.fspath(path))
  if fresh_params is None:
    fresh_params = init_params(config, seed=seed)
  return merge_backbone(fresh_params, backbone, source=os.fspath(path))


def init_params(config, *, seed: int = 0) -> Params:
  """A fresh `Transformer(config)` parameter tree (plain dict, no 'params')."""
  return to_plain_dict(network.init_params(config, jax.random.PRNGKey(seed)))


__all__ = [
    'CheckpointError', 'CONDITIONING_KEY', 'load_t5x_params',
    't5x_config_from_params', 'load_hf_t5', 'hf_t5_to_t5x', 'merge_backbone',
    'split_backbone', 'load_backbone', 'load_pretrained', 'init_params',
    'is_hf_t5_directory', 'absolute_ts_spec', 'flatten_params', 'unflatten_params',
    'BACKBONE_KEYS', 'AdafactorCheckpointState', 'load_t5x_optimizer_state',
    'load_optimizer_state', 'adafactor_state_from_t5x',
]
