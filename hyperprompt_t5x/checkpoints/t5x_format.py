"""T5X checkpoints -> the T5X parameter tree (and Adafactor state) as float32 numpy.

T5X writes `checkpoint_N/checkpoint`, a msgpack of
`{'version', 'optimizer': {'target': params, 'state': ...}}` (newer:
`{'target', 'state'}`); small arrays are inline (flax's msgpack ndarray
extension), large ones are replaced by TensorStore zarr specs whose
`kvstore.path` is relative to `checkpoint_N/` (file or gcs driver). This
module reads both, locally or on `gs://`, without T5X or TensorFlow; also
orbax checkpoints (newer T5X, this project's TrainState).
Public names are re-exported by `hyperprompt_t5x.checkpoints.pretrained`; tree helpers:
trees.py.
"""
import dataclasses
import json
import os
import re
from typing import Any, Dict, Mapping, Optional, Tuple

from flax import serialization
import numpy as np

from hyperprompt_t5x.checkpoints import step_dirs
from hyperprompt_t5x.checkpoints.errors import CheckpointError
from hyperprompt_t5x.checkpoints.trees import flatten_params, to_plain_dict, unflatten_params
from hyperprompt_t5x.model.network import T5Config

Params = Dict[str, Any]
BACKBONE_KEYS = ('token_embedder', 'encoder', 'decoder')


def to_float32(value: Any, name: str, source: str) -> np.ndarray:
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


def is_gcs_path(path: str) -> bool:
  return path.startswith('gs://')


def _path_join(directory: str, name: str) -> str:
  return directory.rstrip('/') + '/' + name if is_gcs_path(directory) else (
      os.path.join(directory, name))


def _gcs_kvstore(path: str) -> Dict[str, str]:
  """'gs://bucket/a/b' -> tensorstore gcs kvstore spec."""
  bucket, key = _GCS_RE.fullmatch(path).groups()
  return {'driver': 'gcs', 'bucket': bucket, 'path': key}


def read_kvstore_bytes(kvstore: Mapping[str, Any]) -> Optional[bytes]:
  """One whole object through a tensorstore kvstore spec ({driver, path, ...});
  None if absent. How the msgpack of a `gs://` checkpoint is fetched."""
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  kvstore = dict(kvstore)
  key = kvstore.pop('path')
  result = ts.KvStore.open(kvstore).result().read(key).result()
  return bytes(result.value) if result.state == 'value' else None


def _read_bytes(path: str) -> Optional[bytes]:
  """The whole file, local or gs:// (through tensorstore); None if absent."""
  if is_gcs_path(path):
    return read_kvstore_bytes(_gcs_kvstore(path))
  if not os.path.isfile(path):
    return None
  with open(path, 'rb') as f:
    return f.read()


def _checkpoint_file(path: str) -> Tuple[str, str]:
  """A checkpoint dir or its msgpack file -> (checkpoint dir, msgpack file)."""
  path = os.fspath(path)
  if is_gcs_path(path):
    if path.rstrip('/').endswith('/checkpoint'):
      return path.rstrip('/').rsplit('/', 1)[0], path.rstrip('/')
    return path.rstrip('/'), _path_join(path, 'checkpoint')
  if not os.path.exists(path):
    raise CheckpointError(f'{path}: no such checkpoint file or directory.')
  if os.path.isdir(path):
    file = os.path.join(path, 'checkpoint')
    if not os.path.isfile(file):
      steps = [step_dirs.name(s) for s in step_dirs.steps_in(path)]
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
  spec = json.loads(json.dumps(to_plain_dict(spec)))  # deep copy, plain types
  kvstore = spec.get('kvstore', {})
  if isinstance(kvstore, str):  # very old: kvstore given as a driver URL
    kvstore = {'driver': 'file', 'path': kvstore}
  if 'path' not in kvstore and 'path' in spec:  # tensorstore < 0.1.14 layout
    kvstore['path'] = spec.pop('path')
  rel = kvstore.get('path')
  if not rel:
    raise ValueError(f'TensorStore spec without a path: {spec}')
  if is_gcs_path(rel):
    spec['kvstore'] = _gcs_kvstore(rel)
  elif is_gcs_path(ckpt_dir):
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
  elif isinstance(state.get('params'), Mapping):
    target = state['params']  # this project's TrainState {'step', 'params', ...}
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
    out[name] = to_float32(arr, name, source)
  return out


def load_t5x_params(path: str) -> Params:
  """Reads the parameters (`target` tree) of a T5X checkpoint.

  Args:
    path: a `checkpoint_N` directory holding the msgpack file `checkpoint`, or
      that file itself; local or `gs://`. A local orbax PyTree checkpoint
      (`_METADATA`, directly or in `state/`) is read too.

  Returns:
    Nested dict {'token_embedder', 'encoder', 'decoder'} of float32 numpy
    arrays, named and shaped as T5X stores them (2-D kernels).

  Raises:
    CheckpointError: missing path, unreadable/truncated msgpack, a file that is
      not a T5 checkpoint, or an unreadable TensorStore array; names the path.
  """
  state, resolve = _read_checkpoint(path)
  return _params(state, resolve)


def _params(state: Any, resolve: '_Resolver') -> Params:
  target = _select_target(state, resolve.source)
  return unflatten_params(resolve(flatten_params(_unfreeze_specs(target))))


@dataclasses.dataclass(frozen=True)
class AdafactorCheckpointState:
  """The Adafactor state a checkpoint holds: its step and T5X's `param_states`.

  param_states: {'encoder/.../kernel': {'v_row', 'v_col', 'v'[, 'm']}} as
  float32 numpy (unused slots are T5X's (1,) placeholders).
  """
  step: int
  param_states: Dict[str, Dict[str, np.ndarray]]
  source: str


_ADAFACTOR_SLOTS = ('v_row', 'v_col', 'v')


def load_t5x_optimizer_state(path: str) -> Optional[AdafactorCheckpointState]:
  """The Adafactor state and step of a checkpoint; None when it holds none.

  Reads T5X's `optimizer/state` (legacy msgpack) or `state` ({'step',
  'param_states'}), and this project's orbax TrainState (the Adafactor node of
  its `opt_state`: {'count', 'v_row', 'v_col', 'v'}, as optim.py writes it).
  An AdamW TrainState or a parameters-only checkpoint gives None.
  """
  state, resolve = _read_checkpoint(path)
  return _adafactor_state(state, resolve)


def load_params_and_optimizer_state(path: str
                                    ) -> Tuple[Params, Optional[AdafactorCheckpointState]]:
  """`load_t5x_params` and `load_t5x_optimizer_state` of one checkpoint, read once."""
  state, resolve = _read_checkpoint(path)
  return _params(state, resolve), _adafactor_state(state, resolve)


def adafactor_state_from_t5x(optimizer_state: Any) -> Optional[AdafactorCheckpointState]:
  """T5X's in-memory Adafactor `OptimizerState` (step, param_states) in the same form."""
  state_dict = serialization.to_state_dict(optimizer_state)
  return _adafactor_state({'state': state_dict}, _Resolver('<t5x OptimizerState>'))


def _adafactor_state(state: Any, resolve: '_Resolver') -> Optional[AdafactorCheckpointState]:
  found = _find_adafactor_state(state)
  if found is None:
    return None
  step, flat = found
  param_states: Dict[str, Dict[str, np.ndarray]] = {}
  for key, value in resolve(flat).items():
    name, slot = key.rsplit('/', 1)
    param_states.setdefault(name, {})[slot] = value
  return AdafactorCheckpointState(int(np.asarray(step)), param_states, resolve.source)


def _find_adafactor_state(state: Any) -> Optional[Tuple[Any, Dict[str, Any]]]:
  """(step, {'<param>/<slot>': leaf}) of the Adafactor state in a raw checkpoint tree."""
  if not isinstance(state, Mapping):
    return None
  legacy = state.get('optimizer')
  container = legacy.get('state') if isinstance(legacy, Mapping) else state.get('state')
  if isinstance(container, Mapping) and isinstance(container.get('param_states'), Mapping):
    flat = flatten_params(_unfreeze_specs(container['param_states']))
    if 'step' in container and flat:
      return container['step'], flat
  if isinstance(state.get('opt_state'), Mapping):  # this project's TrainState
    nodes = [state['opt_state']]
    while nodes:
      node = nodes.pop()
      if {'count', *_ADAFACTOR_SLOTS} <= set(node):
        flat = {f'{name}/{slot}': leaf for slot in _ADAFACTOR_SLOTS
                for name, leaf in flatten_params(node[slot]).items()
                if isinstance(leaf, np.ndarray)}
        return (node['count'], flat) if flat else None
      nodes.extend(v for v in node.values() if isinstance(v, Mapping))
  return None


class _Resolver:
  """Turns a checkpoint's flat leaves (inline arrays, TensorStore specs) into float32."""

  def __init__(self, source: str, ckpt_dir: Optional[str] = None, version: int = 0):
    self.source, self.ckpt_dir, self.version = source, ckpt_dir, version

  def __call__(self, flat: Mapping[str, Any]) -> Dict[str, np.ndarray]:
    inline, specs = {}, {}
    for name, value in flat.items():
      if isinstance(value, _Spec):
        specs[name] = value.spec
      elif hasattr(value, '__array__') or np.isscalar(value):  # numpy, jax arrays
        inline[name] = to_float32(value, name, self.source)
      else:
        raise CheckpointError(
            f'{self.source}: parameter {name!r} is a {type(value).__name__}, expected an '
            'array or a TensorStore spec.')
    if specs:
      inline.update(_read_tensorstores(specs, self.ckpt_dir, self.version, self.source))
    return {n: inline[n] for n in flat}


def _read_checkpoint(path: str) -> Tuple[Any, _Resolver]:
  """(raw state tree, resolver of its leaves) of a T5X msgpack or orbax checkpoint."""
  path = os.fspath(path)
  orbax_dir = _orbax_item_dir(path)
  if orbax_dir is not None:
    return _read_orbax_tree(orbax_dir), _Resolver(orbax_dir)
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
  version = int(state.get('version', 0)) if isinstance(state, Mapping) else 0
  return state, _Resolver(file, ckpt_dir, version)


def _orbax_item_dir(path: str) -> Optional[str]:
  """The orbax PyTree dir in `path` (itself or its `state/` item), else None.

  Newer T5X and this project's trainer write orbax checkpoints:
  `checkpoint_N/{state/,}_METADATA` + OCDBT/zarr arrays, no msgpack file.
  """
  if is_gcs_path(path) or not os.path.isdir(path):
    return None
  if os.path.isfile(os.path.join(path, 'checkpoint')):
    return None  # legacy msgpack layout
  for item in (path, os.path.join(path, 'state')):
    if os.path.isfile(os.path.join(item, '_METADATA')):
      return item
  return None


def _read_orbax_tree(item_dir: str) -> Any:
  """An orbax PyTree checkpoint as host numpy (no device shardings)."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  try:
    checkpointer = ocp.PyTreeCheckpointer()
    metadata = checkpointer.metadata(item_dir)
    tree = getattr(getattr(metadata, 'item_metadata', metadata), 'tree', None)
    tree = tree if tree is not None else getattr(metadata, 'item_metadata', metadata)
    restore_args = jax.tree_util.tree_map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return checkpointer.restore(item_dir, args=ocp.args.PyTreeRestore(
        restore_args=restore_args))
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f'{item_dir}: unreadable orbax checkpoint: {e}') from e


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
  params = to_plain_dict(params)
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
