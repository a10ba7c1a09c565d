"""Pretrained T5 1.1 weights into the T5X parameter tree.

Three readers and one merge, all producing / consuming the backbone tree of
DESIGN.md §2 (`token_embedder`, `encoder`, `decoder`) as nested dicts of
float32 numpy arrays:

* `load_t5x_params(path)`: a T5X checkpoint, i.e. the msgpack file
  `checkpoint_N/checkpoint` whose small arrays are inline and whose large ones
  are TensorStore zarr specs relative to the checkpoint directory (local or
  `gs://`).
* `load_hf_t5(directory)`: a Hugging Face `T5ForConditionalGeneration`
  directory (config.json + safetensors, single file or sharded).
* `merge_backbone(fresh, pretrained)`: backbone from the checkpoint, every
  task-conditioning parameter (top-level `task_conditioning`) from the fresh
  initialisation; one `CheckpointError` lists every mismatch.
* `load_pretrained(path, config)`: detects the format and does all of it.

Only numpy, msgpack (via flax.serialization), tensorstore and safetensors are
used here; no TensorFlow.
"""
import json
import logging
import os
import re
from typing import Any, Dict, Mapping, Optional, Tuple

from flax import serialization
import numpy as np

Params = Dict[str, Any]

# The one top-level key holding all task-conditioning parameters; must equal
# `hyperprompt_t5x.network.CONDITIONING_KEY` (checked in the tests).
CONDITIONING_KEY = 'task_conditioning'
BACKBONE_KEYS = ('token_embedder', 'encoder', 'decoder')
# T5 1.1 relative attention: 32 buckets, max distance 128 (DESIGN.md §2).
_RELPOS_BUCKETS = 32
_RELPOS_MAX_DISTANCE = 128
_HF_WEIGHT_FILES = ('model.safetensors', 'model.safetensors.index.json')


class CheckpointError(ValueError):
  """A checkpoint cannot be read, or does not fit the model; says what and where."""


# ----------------------------------------------------------------------------
# Small tree helpers.
# ----------------------------------------------------------------------------


def _unfreeze(tree: Any) -> Any:
  """Nested Mapping (dict / FrozenDict) -> nested plain dict, leaves untouched."""
  if isinstance(tree, Mapping):
    return {k: _unfreeze(v) for k, v in tree.items()}
  return tree


def flatten_params(tree: Mapping[str, Any], prefix: str = '') -> Dict[str, Any]:
  """Nested dict -> {'encoder/layers_0/attention/query/kernel': leaf}."""
  flat = {}
  for key, value in tree.items():
    name = f'{prefix}/{key}' if prefix else str(key)
    if isinstance(value, Mapping):
      flat.update(flatten_params(value, name))
    else:
      flat[name] = value
  return flat


def unflatten_params(flat: Mapping[str, Any]) -> Params:
  """Inverse of `flatten_params`."""
  tree: Params = {}
  for name, value in flat.items():
    *parents, leaf = name.split('/')
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def _as_float32(value: Any, name: str, source: str) -> np.ndarray:
  """Any stored float array (incl. bfloat16) -> float32 numpy."""
  arr = np.asarray(value)
  if arr.dtype.kind != 'f' and not arr.dtype.name.startswith(('bfloat', 'float')):
    raise CheckpointError(
        f'{source}: parameter {name!r} has dtype {arr.dtype}, expected a '
        'floating-point array.')
  return arr.astype(np.float32)


# ----------------------------------------------------------------------------
# T5X: msgpack + TensorStore.
# ----------------------------------------------------------------------------

_GCS_RE = re.compile(r'^gs://([^/]+)/?(.*)$', re.DOTALL)


def _is_gcs(path: str) -> bool:
  return path.startswith('gs://')


def _path_join(directory: str, name: str) -> str:
  return directory.rstrip('/') + '/' + name if _is_gcs(directory) else (
      os.path.join(directory, name))


def _gcs_kvstore(path: str) -> Dict[str, str]:
  """'gs://bucket/a/b' -> tensorstore gcs kvstore spec."""
  bucket, key = _GCS_RE.fullmatch(path).groups()
  return {'driver': 'gcs', 'bucket': bucket, 'path': key}


def _read_bytes(path: str) -> Optional[bytes]:
  """The whole file, local or gs:// (through tensorstore); None if absent."""
  if _is_gcs(path):
    import tensorstore as ts  # pylint: disable=g-import-not-at-top
    spec = _gcs_kvstore(path)
    store = ts.KvStore.open({'driver': 'gcs', 'bucket': spec['bucket']}).result()
    result = store.read(spec['path']).result()
    return bytes(result.value) if result.state == 'value' else None
  if not os.path.isfile(path):
    return None
  with open(path, 'rb') as f:
    return f.read()


def _checkpoint_file(path: str) -> Tuple[str, str]:
  """A checkpoint dir or its msgpack file -> (checkpoint dir, msgpack file)."""
  path = os.fspath(path)
  if _is_gcs(path):
    if path.rstrip('/').endswith('/checkpoint'):
      return path.rstrip('/').rsplit('/', 1)[0], path.rstrip('/')
    return path.rstrip('/'), _path_join(path, 'checkpoint')
  if not os.path.exists(path):
    raise CheckpointError(f'{path}: no such checkpoint file or directory.')
  if os.path.isdir(path):
    file = os.path.join(path, 'checkpoint')
    if not os.path.isfile(file):
      steps = sorted(d for d in os.listdir(path) if d.startswith('checkpoint_'))
      hint = (f' It holds {", ".join(steps)}: pass one of those.' if steps else '')
      raise CheckpointError(
          f'{path}: not a T5X checkpoint directory (no `checkpoint` file in it).'
          + hint)
    return path, file
  return os.path.dirname(os.path.abspath(path)), path


def _is_ts_spec(value: Any) -> bool:
  return isinstance(value, Mapping) and 'driver' in value and (
      'kvstore' in value or 'path' in value)


def absolute_ts_spec(spec: Mapping[str, Any], ckpt_dir: str) -> Dict[str, Any]:
  """A T5X TensorStore spec (path relative to the checkpoint dir) -> openable spec.

  T5X writes paths relative to `checkpoint_N/` so checkpoints can be moved; a
  `gs://` checkpoint dir gives the gcs driver with its bucket (T5X writes a
  dummy bucket), a local one the file driver, whatever driver was recorded.
  Chunking and compression are dropped: the stored zarr metadata has them.
  """
  spec = json.loads(json.dumps(_unfreeze(spec)))  # deep copy, plain types
  kvstore = spec.get('kvstore', {})
  if isinstance(kvstore, str):  # very old: kvstore given as a driver URL
    kvstore = {'driver': 'file', 'path': kvstore}
  if 'path' not in kvstore and 'path' in spec:  # tensorstore < 0.1.14 layout
    kvstore['path'] = spec.pop('path')
  rel = kvstore.get('path')
  if not rel:
    raise ValueError(f'TensorStore spec without a path: {spec}')
  if _is_gcs(rel):
    spec['kvstore'] = _gcs_kvstore(rel)
  elif _is_gcs(ckpt_dir):
    spec['kvstore'] = _gcs_kvstore(_path_join(ckpt_dir, rel))
  else:
    spec['kvstore'] = {'driver': 'file',
                       'path': rel if os.path.isabs(rel) else os.path.join(ckpt_dir, rel)}
  metadata = spec.get('metadata', {})
  for key in ('chunks', 'compressor'):
    metadata.pop(key, None)
  return spec


def _select_target(state: Any, source: str) -> Mapping[str, Any]:
  """The parameter tree inside a restored T5X state."""
  if not isinstance(state, Mapping):
    raise CheckpointError(
        f'{source}: not a T5X checkpoint (msgpack holds a {type(state).__name__}, '
        'expected a dict with `optimizer/target` or `target`).')
  if isinstance(state.get('optimizer'), Mapping) and 'target' in state['optimizer']:
    target = state['optimizer']['target']  # legacy: {'version', 'optimizer': ...}
  elif isinstance(state.get('target'), Mapping):
    target = state['target']  # newer: {'target', 'state', ...}
  elif any(k in state for k in BACKBONE_KEYS):
    target = state  # a bare params tree
  else:
    raise CheckpointError(
        f'{source}: not a T5X checkpoint: no `optimizer/target` or `target` in it '
        f'(top-level keys: {sorted(map(str, state))}).')
  missing = [k for k in BACKBONE_KEYS if k not in target]
  if missing:
    raise CheckpointError(
        f'{source}: not a T5 encoder-decoder checkpoint: `target` lacks '
        f'{missing} (has {sorted(map(str, target))}).')
  return target


def _read_tensorstores(specs: Mapping[str, Mapping[str, Any]], ckpt_dir: str,
                       version: int, source: str) -> Dict[str, np.ndarray]:
  """Reads all TensorStore-backed params concurrently -> {name: float32}."""
  import tensorstore as ts  # pylint: disable=g-import-not-at-top

  def fail(name, e):
    return CheckpointError(
        f'{source}: cannot read the TensorStore array of parameter {name!r} '
        f'(checkpoint version {version}; spec '
        f'{absolute_ts_spec(specs[name], ckpt_dir)}): {e}')

  pending, out = {}, {}
  for name, spec in specs.items():  # start all reads, then collect them
    try:
      pending[name] = ts.open(absolute_ts_spec(spec, ckpt_dir), open=True,
                              read=True).result().read()
    except Exception as e:  # pylint: disable=broad-except
      raise fail(name, e) from e
  for name, future in pending.items():
    try:
      arr = np.asarray(future.result())
    except Exception as e:  # pylint: disable=broad-except
      raise fail(name, e) from e
    if arr.dtype == np.uint16:
      # Checkpoint version < 3 wrote bfloat16 as its raw uint16 bits.
      import ml_dtypes  # pylint: disable=g-import-not-at-top
      arr = arr.view(ml_dtypes.bfloat16)
    out[name] = _as_float32(arr, name, source)
  return out


def load_t5x_params(path: str) -> Params:
  """Reads the parameters (`target` tree) of a T5X checkpoint.

  Args:
    path: a `checkpoint_N` directory holding the msgpack file `checkpoint`, or
      that file itself; local or `gs://`.

  Returns:
    Nested dict {'token_embedder', 'encoder', 'decoder'} of float32 numpy
    arrays, named and shaped as T5X stores them (2-D kernels).

  Raises:
    CheckpointError: missing path, unreadable/truncated msgpack, a file that is
      not a T5 checkpoint, or an unreadable TensorStore array; names the path.
  """
  path = os.fspath(path)
  ckpt_dir, file = _checkpoint_file(path)
  try:
    raw = _read_bytes(file)
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f'{file}: cannot read checkpoint file: {e}') from e
  if raw is None:
    raise CheckpointError(f'{file}: no such checkpoint file.')
  try:
    state = serialization.msgpack_restore(raw)
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(
        f'{file}: not a readable T5X msgpack checkpoint (truncated or not '
        f'msgpack: {type(e).__name__}: {e}).') from e
  target = _select_target(state, file)
  version = int(state.get('version', 0)) if isinstance(state, Mapping) else 0

  flat = flatten_params(_unfreeze_specs(target))
  inline, specs = {}, {}
  for name, value in flat.items():
    if isinstance(value, _Spec):
      specs[name] = value.spec
    elif isinstance(value, np.ndarray) or np.isscalar(value):
      inline[name] = _as_float32(value, name, file)
    else:
      raise CheckpointError(
          f'{file}: parameter {name!r} is a {type(value).__name__}, expected an '
          'array or a TensorStore spec.')
  inline.update(_read_tensorstores(specs, ckpt_dir, version, file))
  return unflatten_params({n: inline[n] for n in flat})


class _Spec:
  """Marks a TensorStore spec dict as a leaf while flattening."""

  def __init__(self, spec):
    self.spec = spec


def _unfreeze_specs(tree: Any) -> Any:
  if _is_ts_spec(tree):
    return _Spec(tree)
  if isinstance(tree, Mapping):
    return {k: _unfreeze_specs(v) for k, v in tree.items()}
  return tree


def _layer_count(stack: Mapping[str, Any]) -> int:
  return sum(1 for k in stack if re.fullmatch(r'layers_\d+', str(k)))


def t5x_config_from_params(params: Mapping[str, Any], **overrides):
  """Infers the backbone `T5Config` from a T5X parameter tree's shapes.

  emb_dim and vocab from the embedding, heads from the relpos table [H, 32],
  head_dim from the query kernel [D, H*K], layers by counting `layers_i`, mlp
  from `wo` [F, D], activations from `wi` / `wi_0, wi_1`, logits_via_embedding
  from the absence of `decoder/logits_dense`. `overrides` set any other field
  (dtype, method, num_tasks, ...).
  """
  from hyperprompt_t5x.network import T5Config  # pylint: disable=g-import-not-at-top
  params = _unfreeze(params)
  if 'params' in params and 'encoder' not in params:
    params = params['params']
  try:
    vocab, emb = np.shape(params['token_embedder']['embedding'])
    enc, dec = params['encoder'], params['decoder']
    heads = np.shape(enc['relpos_bias']['rel_embedding'])[0]
    joined = np.shape(enc['layers_0']['attention']['query']['kernel'])[1]
    mlp = enc['layers_0']['mlp']
    mlp_dim = np.shape(mlp['wo']['kernel'])[0]
  except (KeyError, TypeError, ValueError) as e:
    raise CheckpointError(
        f'cannot infer a T5 config: parameter tree lacks {e} (expects the T5X '
        'tree token_embedder/encoder/decoder).') from e
  if joined % heads:
    raise CheckpointError(
        f'cannot infer head_dim: query kernel width {joined} is not a multiple of '
        f'{heads} heads.')
  if 'wi_0' in mlp:
    n_act = sum(1 for k in mlp if re.fullmatch(r'wi_\d+', str(k)))
    activations = ('gelu', 'linear') if n_act == 2 else ('gelu',) + ('linear',) * (n_act - 1)
  else:
    activations = ('relu',)
  fields = dict(
      vocab_size=int(vocab), emb_dim=int(emb), num_heads=int(heads),
      head_dim=int(joined // heads), num_encoder_layers=_layer_count(enc),
      num_decoder_layers=_layer_count(dec), mlp_dim=int(mlp_dim),
      mlp_activations=activations,
      logits_via_embedding='logits_dense' not in dec)
  fields.update(overrides)
  return T5Config(**fields)


# ----------------------------------------------------------------------------
# Hugging Face T5 (safetensors).
# ----------------------------------------------------------------------------


def is_hf_t5_directory(path: str) -> bool:
  """True for a directory with config.json and (sharded) model.safetensors."""
  path = os.fspath(path)
  return (not _is_gcs(path) and os.path.isdir(path)
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
              tensors[key] = _as_float32(fj.get_tensor(key), key, file)
          else:
            tensors[key] = _as_float32(f.get_tensor(key), key, file)
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
  """Maps Hugging Face T5 tensor names onto the T5X tree (DESIGN.md §2).

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
  return _unfreeze(params)


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
  from hyperprompt_t5x.network import T5Config  # pylint: disable=g-import-not-at-top
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
  fresh = _unfreeze(fresh_params)
  wrapped = set(fresh) == {'params'}
  if wrapped:
    fresh = fresh['params']
  pretrained = _unfreeze(pretrained_backbone)
  if set(pretrained) == {'params'}:
    pretrained = pretrained['params']

  want = flatten_params({k: v for k, v in fresh.items() if k != CONDITIONING_KEY})
  have = flatten_params({k: v for k, v in pretrained.items() if k != CONDITIONING_KEY})
  if CONDITIONING_KEY in pretrained:
    logging.info('%s: ignoring its %s params (conditioning starts fresh).',
                 source, CONDITIONING_KEY)
  missing = sorted(set(want) - set(have))
  unexpected = sorted(set(have) - set(want))
  wrong = sorted(f'{n}: checkpoint {tuple(np.shape(have[n]))}, model '
                 f'{tuple(np.shape(want[n]))}'
                 for n in set(want) & set(have)
                 if tuple(np.shape(want[n])) != tuple(np.shape(have[n])))
  if missing or unexpected or wrong:
    parts = []
    if missing:
      parts.append(f'{len(missing)} missing from the checkpoint: {missing}')
    if wrong:
      parts.append(f'{len(wrong)} with the wrong shape: {wrong}')
    if unexpected:
      parts.append(f'{len(unexpected)} unexpected in the checkpoint: {unexpected}')
    raise CheckpointError(
        f'{source}: checkpoint does not fit the model backbone; '
        + '; '.join(parts))

  merged = unflatten_params({
      n: np.asarray(have[n], dtype=_dtype_of(want[n])) for n in want})
  if CONDITIONING_KEY in fresh:
    merged[CONDITIONING_KEY] = fresh[CONDITIONING_KEY]
  # Keep the fresh tree's key order (cosmetic; flax does not care).
  merged = {k: merged[k] for k in fresh if k in merged}
  return {'params': merged} if wrapped else merged


def _dtype_of(leaf: Any):
  dtype = getattr(leaf, 'dtype', None)
  return dtype if dtype is not None else np.float32


def split_backbone(params: Mapping[str, Any]) -> Tuple[Params, Params]:
  """params -> (backbone tree, conditioning tree or {})."""
  params = _unfreeze(params)
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


def load_pretrained(path: str, config, fresh_params: Optional[Mapping[str, Any]] = None,
                    *, seed: int = 0) -> Params:
  """INITIAL_CHECKPOINT_PATH -> full params for `config`.

  Reads the backbone (T5X checkpoint dir/file, or a Hugging Face T5 directory),
  then merges it into `fresh_params` (or a fresh `Transformer(config)` init
  from `seed`), so task conditioning starts from its initialisation.

  Raises:
    CheckpointError: unreadable checkpoint, or one that does not fit `config`.
  """
  backbone = load_backbone(path)
  if fresh_params is None:
    fresh_params = init_params(config, seed=seed)
  return merge_backbone(fresh_params, backbone, source=os.fspath(path))


def init_params(config, *, seed: int = 0) -> Params:
  """A fresh `Transformer(config)` parameter tree (unwrapped, no 'params')."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from hyperprompt_t5x import network  # pylint: disable=g-import-not-at-top
  tokens = jnp.ones((1, 4), jnp.int32)
  task_ids = jnp.zeros((1,), jnp.int32)
  variables = network.Transformer(config).init(
      jax.random.PRNGKey(seed), tokens, tokens, tokens, task_ids,
      enable_dropout=False)
  return _unfreeze(variables['params'])


__all__ = [
    'CheckpointError', 'CONDITIONING_KEY', 'load_t5x_params',
    't5x_config_from_params', 'load_hf_t5', 'hf_t5_to_t5x', 'merge_backbone',
    'split_backbone', 'load_backbone', 'load_pretrained', 'init_params',
    'is_hf_t5_directory', 'absolute_ts_spec', 'flatten_params', 'unflatten_params',
]
