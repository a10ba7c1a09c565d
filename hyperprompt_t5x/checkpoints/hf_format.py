"""Hugging Face `T5ForConditionalGeneration` (safetensors) -> the T5X tree.

Name mapping (HF Linear weights are [out, in], T5X kernels [in, out]):
`shared` -> token_embedder/embedding; `{stack}.block.i.layer.j.{SelfAttention,
EncDecAttention}.{q,k,v,o}` -> layers_i/{attention|self_attention|
encoder_decoder_attention}/{query,key,value,out}/kernel (transposed);
`relative_attention_bias` (block 0 only, [32, H]) -> relpos_bias/rel_embedding
[H, 32]; `layer_norm` / `final_layer_norm` -> pre_*_layer_norm /
{encoder,decoder}_norm scales; `DenseReluDense.{wi_0,wi_1,wo}` -> mlp;
`lm_head` -> decoder/logits_dense/kernel (transposed). Public names are
re-exported by `hyperprompt_t5x.checkpoints.pretrained`.
"""
import json
import os
from typing import Any, Dict, Mapping

import numpy as np

from hyperprompt_t5x.checkpoints.t5x_format import to_float32
from hyperprompt_t5x.checkpoints.t5x_format import is_gcs_path
from hyperprompt_t5x.checkpoints.trees import to_plain_dict
from hyperprompt_t5x.checkpoints.errors import CheckpointError
from hyperprompt_t5x.checkpoints.t5x_format import t5x_config_from_params
from hyperprompt_t5x.model.network import T5Config

Params = Dict[str, Any]
# T5 1.1 relative attention: 32 buckets, max distance 128 (docs/METHODS.md, Parameter tree).
_RELPOS_BUCKETS = 32
_RELPOS_MAX_DISTANCE = 128
_HF_WEIGHT_FILES = ('model.safetensors', 'model.safetensors.index.json')


def is_hf_t5_directory(path: str) -> bool:
  """True for a directory with config.json and (sharded) model.safetensors."""
  path = os.fspath(path)
  return (not is_gcs_path(path) and os.path.isdir(path)
          and os.path.isfile(os.path.join(path, 'config.json'))
          and any(os.path.isfile(os.path.join(path, f)) for f in _HF_WEIGHT_FILES))


def _read_safetensors(directory: str) -> Dict[str, np.ndarray]:
  """All tensors of model.safetensors or its shards -> {hf name: float32}."""
  try:
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise CheckpointError(
        f'{directory}: reading Hugging Face checkpoints needs the `safetensors` '
        'package (pip install safetensors).') from e
  index = os.path.join(directory, 'model.safetensors.index.json')
  if os.path.isfile(index):
    try:
      with open(index) as f:
        files = sorted(set(json.load(f)['weight_map'].values()))
    except (OSError, ValueError, KeyError) as e:
      raise CheckpointError(f'{index}: unreadable safetensors index: {e}') from e
  elif os.path.isfile(os.path.join(directory, 'model.safetensors')):
    files = ['model.safetensors']
  else:
    raise CheckpointError(
        f'{directory}: no model.safetensors or model.safetensors.index.json '
        '(only safetensors weights are read; re-save with safe_serialization=True).')
  tensors = {}
  for name in files:
    file = os.path.join(directory, name)
    try:
      with safe_open(file, framework='np') as f:
        for key in f.keys():
          if f.get_slice(key).get_dtype() == 'BF16':
            # numpy has no bfloat16: read those through the jax backend.
            with safe_open(file, framework='flax') as fj:
              tensors[key] = to_float32(fj.get_tensor(key), key, file)
          else:
            tensors[key] = to_float32(f.get_tensor(key), key, file)
    except CheckpointError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f'{file}: unreadable safetensors file: {e}') from e
  return tensors


def _hf_config(directory: str) -> Dict[str, Any]:
  file = os.path.join(directory, 'config.json')
  try:
    with open(file) as f:
      cfg = json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointError(f'{file}: unreadable Hugging Face config: {e}') from e
  model_type = cfg.get('model_type')
  if model_type not in ('t5', None):
    raise CheckpointError(f'{file}: model_type {model_type!r} is not a T5 model.')
  proj = cfg.get('feed_forward_proj', 'relu')
  if proj != 'gated-gelu':
    raise CheckpointError(
        f'{file}: feed_forward_proj={proj!r}; only T5 1.1 style gated-gelu '
        'checkpoints are supported.')
  for key, want in (('relative_attention_num_buckets', _RELPOS_BUCKETS),
                    ('relative_attention_max_distance', _RELPOS_MAX_DISTANCE)):
    if cfg.get(key, want) != want:
      raise CheckpointError(f'{file}: {key}={cfg[key]}, the T5X network uses {want}.')
  if abs(cfg.get('layer_norm_epsilon', 1e-6) - 1e-6) > 1e-12:
    raise CheckpointError(
        f'{file}: layer_norm_epsilon={cfg["layer_norm_epsilon"]}, the T5X network '
        'uses 1e-6.')
  return cfg


def _hf_attention(get, prefix: str) -> Params:
  """HF q/k/v/o Linear weights [out, in] -> T5X 2-D kernels [in, out]."""
  return {t5x: {'kernel': get(f'{prefix}.{hf}.weight').T}
          for hf, t5x in (('q', 'query'), ('k', 'key'), ('v', 'value'), ('o', 'out'))}


def _hf_mlp(get, prefix: str) -> Params:
  return {name: {'kernel': get(f'{prefix}.DenseReluDense.{name}.weight').T}
          for name in ('wi_0', 'wi_1', 'wo')}


def _scale(get, name: str) -> Params:
  return {'scale': get(name)}


def hf_t5_to_t5x(tensors: Mapping[str, np.ndarray], num_encoder_layers: int,
                 num_decoder_layers: int, tie_word_embeddings: bool,
                 source: str = '<hf>') -> Params:
  """Maps Hugging Face T5 tensor names onto the T5X tree (docs/METHODS.md, Parameter tree).

  HF keeps the relative position table only in block 0 of each stack
  ([32, H]); T5X shares one [H, 32] table per stack. HF T5, like T5X, applies
  no 1/sqrt(head_dim) at call time (it is folded into the query init), so q
  maps unscaled. Every HF tensor must be consumed; leftovers are an error.
  """
  used = set()

  def get(name):
    if name not in tensors:
      raise CheckpointError(f'{source}: Hugging Face tensor {name!r} is missing.')
    used.add(name)
    return tensors[name]

  def relpos(stack):
    return {'rel_embedding': get(
        f'{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight').T}

  encoder = {'relpos_bias': relpos('encoder'),
             'encoder_norm': _scale(get, 'encoder.final_layer_norm.weight')}
  for i in range(num_encoder_layers):
    p = f'encoder.block.{i}.layer'
    encoder[f'layers_{i}'] = {
        'pre_attention_layer_norm': _scale(get, f'{p}.0.layer_norm.weight'),
        'attention': _hf_attention(get, f'{p}.0.SelfAttention'),
        'pre_mlp_layer_norm': _scale(get, f'{p}.1.layer_norm.weight'),
        'mlp': _hf_mlp(get, f'{p}.1'),
    }
  decoder = {'relpos_bias': relpos('decoder'),
             'decoder_norm': _scale(get, 'decoder.final_layer_norm.weight')}
  for i in range(num_decoder_layers):
    p = f'decoder.block.{i}.layer'
    decoder[f'layers_{i}'] = {
        'pre_self_attention_layer_norm': _scale(get, f'{p}.0.layer_norm.weight'),
        'self_attention': _hf_attention(get, f'{p}.0.SelfAttention'),
        'pre_cross_attention_layer_norm': _scale(get, f'{p}.1.layer_norm.weight'),
        'encoder_decoder_attention': _hf_attention(get, f'{p}.1.EncDecAttention'),
        'pre_mlp_layer_norm': _scale(get, f'{p}.2.layer_norm.weight'),
        'mlp': _hf_mlp(get, f'{p}.2'),
    }
  embedding = get('shared.weight')
  if not tie_word_embeddings:
    decoder['logits_dense'] = {'kernel': get('lm_head.weight').T}
  # Copies of the shared embedding, written by some versions; must equal it.
  for alias in ('encoder.embed_tokens.weight', 'decoder.embed_tokens.weight') + (
      ('lm_head.weight',) if tie_word_embeddings else ()):
    if alias in tensors:
      used.add(alias)
      if not np.array_equal(tensors[alias], embedding):
        raise CheckpointError(
            f'{source}: {alias} differs from shared.weight although the '
            'embeddings are tied.')
  unexpected = sorted(set(tensors) - used)
  if unexpected:
    raise CheckpointError(
        f'{source}: unexpected Hugging Face tensors (not a T5 1.1 '
        f'T5ForConditionalGeneration?): {unexpected}')
  params = {'token_embedder': {'embedding': embedding},
            'encoder': encoder, 'decoder': decoder}
  return to_plain_dict(params)


def load_hf_t5(directory: str, **overrides):
  """Reads a Hugging Face `T5ForConditionalGeneration` directory.

  Args:
    directory: holds config.json and model.safetensors (or sharded
      model.safetensors.index.json + shards).
    **overrides: other `T5Config` fields (dtype, method, num_tasks, ...).

  Returns:
    (T5Config, params): the backbone config and the T5X-named float32 tree.
    Tied embeddings (`tie_word_embeddings`) map to `logits_via_embedding=True`
    (both scale the decoder output by 1/sqrt(emb_dim) before the tied
    projection).
  """
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    raise CheckpointError(f'{directory}: no such Hugging Face model directory.')
  cfg = _hf_config(directory)
  tensors = _read_safetensors(directory)
  n_enc = int(cfg['num_layers'])
  n_dec = int(cfg.get('num_decoder_layers') or n_enc)
  tied = bool(cfg.get('tie_word_embeddings', True))
  params = hf_t5_to_t5x(tensors, n_enc, n_dec, tied, source=directory)
  fields = dict(
      vocab_size=int(cfg['vocab_size']), emb_dim=int(cfg['d_model']),
      num_heads=int(cfg['num_heads']), head_dim=int(cfg['d_kv']),
      num_encoder_layers=n_enc, num_decoder_layers=n_dec,
      mlp_dim=int(cfg['d_ff']), mlp_activations=('gelu', 'linear'),
      dropout_rate=float(cfg.get('dropout_rate', 0.1)),
      logits_via_embedding=tied)
  fields.update(overrides)
  config = T5Config(**fields)
  # The shapes must agree with config.json (a mislabelled directory otherwise
  # surfaces much later as a shape error in the model).
  _check_shapes_against_config(params, config, directory)
  return config, params


def _check_shapes_against_config(params: Params, config, source: str) -> None:
  inferred = t5x_config_from_params(params)
  fields = ('vocab_size', 'emb_dim', 'num_heads', 'head_dim', 'num_encoder_layers',
            'num_decoder_layers', 'mlp_dim', 'logits_via_embedding')
  diffs = [f'{f}: weights say {getattr(inferred, f)}, config says {getattr(config, f)}'
           for f in fields if getattr(inferred, f) != getattr(config, f)]
  if diffs:
    raise CheckpointError(f'{source}: weights do not match the config: '
                          + '; '.join(diffs))
