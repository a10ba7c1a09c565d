"""T5X checkpoint import: the real tiny checkpoint, the msgpack + TensorStore
layout, merging into a fresh HyperPrompt model, and bad input."""
import functools
import os
import shutil

from flax import serialization
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import tensorstore as ts

from hyperprompt_t5x.checkpoints import pretrained
from hyperprompt_t5x.checkpoints.pretrained import CheckpointError

# The real fixture, by the parameter tree of docs/METHODS.md.
TINY = dict(vocab_size=32128, emb_dim=8, num_heads=4, head_dim=3,
            num_encoder_layers=2, num_decoder_layers=2, mlp_dim=16)


def _raw_target(file):
  """The `optimizer/target` tree as stored, read without our loader."""
  with open(file, 'rb') as f:
    state = serialization.msgpack_restore(f.read())
  return state['optimizer']['target']


@pytest.fixture(scope='module')
def tiny_params(t5x_tiny_checkpoint):
  return pretrained.load_t5x_params(t5x_tiny_checkpoint)


def test_real_checkpoint_loads_every_param_as_float32(t5x_tiny_checkpoint, tiny_params):
  want = pretrained.flatten_params(_raw_target(t5x_tiny_checkpoint))
  got = pretrained.flatten_params(tiny_params)
  assert sorted(got) == sorted(want)
  for name, value in got.items():
    assert value.dtype == np.float32, name
    np.testing.assert_array_equal(value, np.asarray(want[name], np.float32), err_msg=name)
  assert got['decoder/layers_1/encoder_decoder_attention/out/kernel'].shape == (12, 8)


def test_checkpoint_directory_and_file_both_accepted(t5x_tiny_checkpoint, tiny_params, tmp_path):
  ckpt_dir = tmp_path / 'checkpoint_0'
  ckpt_dir.mkdir()
  os.symlink(t5x_tiny_checkpoint, ckpt_dir / 'checkpoint')
  from_dir = pretrained.flatten_params(pretrained.load_t5x_params(ckpt_dir))
  from_file = pretrained.flatten_params(tiny_params)
  assert from_dir.keys() == from_file.keys()
  for name in from_dir:
    np.testing.assert_array_equal(from_dir[name], from_file[name])


def test_config_inferred_from_real_checkpoint(tiny_params):
  config = pretrained.t5x_config_from_params(tiny_params, dropout_rate=0.0)
  for field, value in TINY.items():
    assert getattr(config, field) == value, field
  assert tuple(config.mlp_activations) == ('gelu', 'linear')
  assert not config.logits_via_embedding
  assert config.dropout_rate == 0.0


def test_conditioning_key_matches_network():
  from hyperprompt_t5x.model import network
  assert pretrained.CONDITIONING_KEY is network.CONDITIONING_KEY  # one definition


@pytest.mark.parametrize('method', ['none', 'global'])
def test_real_checkpoint_restores_into_network(tiny_params, t5x_tiny_checkpoint, method):
  from hyperprompt_t5x.model import network
  overrides = dict(method=method, dtype=jnp.float32, dropout_rate=0.0)
  if method != 'none':
    overrides['num_tasks'] = 3
  config = pretrained.t5x_config_from_params(tiny_params, **overrides)
  # The network's own tree (eval_shape: no init compile); conditioning leaves get
  # stand-in "fresh" values that the merge must pass through untouched.
  rng = np.random.default_rng(1)
  fresh = pretrained.unflatten_params({
      name: (rng.normal(size=leaf.shape).astype(leaf.dtype)
             if name.startswith(network.CONDITIONING_KEY + '/') else leaf)
      for name, leaf in pretrained.flatten_params(network.param_shapes(config)).items()})
  merged = pretrained.merge_backbone(fresh, tiny_params, source=str(t5x_tiny_checkpoint))

  flat_fresh = pretrained.flatten_params(fresh)
  flat_merged = pretrained.flatten_params(merged)
  flat_ckpt = pretrained.flatten_params(tiny_params)
  assert flat_merged.keys() == flat_fresh.keys()
  backbone = {n for n in flat_fresh if not n.startswith(network.CONDITIONING_KEY + '/')}
  # Every backbone param of the network is in the checkpoint and vice versa.
  assert backbone == set(flat_ckpt)
  for name in backbone:
    np.testing.assert_array_equal(np.asarray(flat_merged[name]), flat_ckpt[name], err_msg=name)
  conditioning = set(flat_fresh) - backbone
  assert bool(conditioning) == (method != 'none')
  for name in conditioning:  # conditioning comes from the fresh init, untouched
    assert flat_merged[name] is flat_fresh[name], name

  tokens = np.array([[5, 6, 7, 1, 0], [9, 1, 0, 0, 0]], np.int32)
  targets = np.array([[3, 4, 1], [8, 1, 0]], np.int32)
  inputs = np.array([[0, 3, 4], [0, 8, 1]], np.int32)
  task_ids = np.array([0, 2], np.int32) if method != 'none' else None
  logits = jax.jit(functools.partial(network.Transformer(config).apply, enable_dropout=False))(
      {'params': merged}, tokens, inputs, targets, task_ids)
  assert logits.shape == (2, 3, TINY['vocab_size'])
  assert np.all(np.isfinite(np.asarray(logits)))


def test_load_pretrained_detects_t5x(t5x_tiny_checkpoint, tiny_params):
  from hyperprompt_t5x.model import network
  config = pretrained.t5x_config_from_params(tiny_params, method='none', dtype=jnp.float32)
  params = pretrained.load_pretrained(t5x_tiny_checkpoint, config,
                                       fresh_params=network.param_shapes(config))
  emb = params['token_embedder']['embedding']
  np.testing.assert_array_equal(np.asarray(emb), tiny_params['token_embedder']['embedding'])


# ---------------------------------------------------------------------------
# The msgpack + TensorStore layout, written here the way T5X writes it.
# ---------------------------------------------------------------------------


def _write_t5x_tensorstore_checkpoint(ckpt_dir, params, *, version=3, inline_below=64,
                                      store_dtypes=None, top='optimizer'):
  """Writes `params` as T5X does: small arrays inline in the msgpack, the rest
  as zarr arrays at `ckpt_dir/target.<dotted name>` referenced by relative specs."""
  store_dtypes = store_dtypes or {}
  os.makedirs(ckpt_dir)
  flat = pretrained.flatten_params(params)
  stored = {}
  for name, value in flat.items():
    if value.size < inline_below:
      stored[name] = value
      continue
    rel = 'target.' + name.replace('/', '.')
    dtype = store_dtypes.get(name, '<f4')
    spec = {'driver': 'zarr',
            'kvstore': {'driver': 'file', 'path': rel},
            'metadata': {'shape': list(value.shape), 'chunks': list(value.shape),
                         'dtype': dtype, 'compressor': {'id': 'gzip', 'level': 1}}}
    if dtype == 'bfloat16':
      data = value.astype(ml_dtypes.bfloat16)
    elif dtype == '<u2':  # version 2: bfloat16 bits as uint16
      data = value.astype(ml_dtypes.bfloat16).view(np.uint16)
    else:
      data = value
    write_spec = dict(spec, kvstore={'driver': 'file', 'path': os.path.join(ckpt_dir, rel)})
    store = ts.open(write_spec, create=True, open=True).result()
    store.write(data).result()
    stored[name] = spec
  target = pretrained.unflatten_params(stored)
  if top == 'optimizer':
    state = {'version': version,
             'optimizer': {'target': target, 'state': {'step': np.array(7, np.int32)}}}
  else:
    state = {'target': target, 'state': {'step': np.array(7, np.int32)}}
  with open(os.path.join(ckpt_dir, 'checkpoint'), 'wb') as f:
    f.write(serialization.msgpack_serialize(state))


def _small_tree(seed=0):
  rng = np.random.default_rng(seed)
  return {
      'token_embedder': {'embedding': rng.normal(size=(40, 8)).astype(np.float32)},
      'encoder': {'relpos_bias': {'rel_embedding': rng.normal(size=(2, 32)).astype(np.float32)},
                  'encoder_norm': {'scale': rng.normal(size=(8,)).astype(np.float32)},
                  'layers_0': {'mlp': {'wo': {'kernel': rng.normal(size=(16, 8)).astype(np.float32)}}}},
      'decoder': {'decoder_norm': {'scale': rng.normal(size=(8,)).astype(np.float32)},
                  'logits_dense': {'kernel': rng.normal(size=(8, 40)).astype(np.float32)}},
  }


def test_tensorstore_layout_loads_what_was_written(tmp_path):
  tree = _small_tree()
  bf16 = 'encoder/layers_0/mlp/wo/kernel'
  written = tmp_path / 'first' / 'checkpoint_7'
  _write_t5x_tensorstore_checkpoint(str(written), tree, store_dtypes={bf16: 'bfloat16'})
  # Paths are relative to the checkpoint dir: moving it must not matter.
  moved = tmp_path / 'second' / 'checkpoint_7'
  moved.parent.mkdir()
  shutil.move(str(written), str(moved))
  assert (moved / 'target.token_embedder.embedding').is_dir()

  for path in (moved, moved / 'checkpoint'):
    got = pretrained.flatten_params(pretrained.load_t5x_params(str(path)))
    want = pretrained.flatten_params(tree)
    assert got.keys() == want.keys()
    for name in want:
      expected = want[name]
      if name == bf16:
        expected = expected.astype(ml_dtypes.bfloat16).astype(np.float32)
        assert not np.array_equal(expected, want[name])  # rounding did happen
      assert got[name].dtype == np.float32
      np.testing.assert_array_equal(got[name], expected, err_msg=name)


def test_version2_uint16_bfloat16_and_top_level_target(tmp_path):
  tree = _small_tree(1)
  name = 'token_embedder/embedding'
  _write_t5x_tensorstore_checkpoint(str(tmp_path / 'v2'), tree, version=2,
                                    store_dtypes={name: '<u2'})
  got = pretrained.flatten_params(pretrained.load_t5x_params(str(tmp_path / 'v2')))
  np.testing.assert_array_equal(
      got[name], tree['token_embedder']['embedding'].astype(ml_dtypes.bfloat16).astype(np.float32))

  _write_t5x_tensorstore_checkpoint(str(tmp_path / 'new'), tree, top='target')
  got = pretrained.flatten_params(pretrained.load_t5x_params(str(tmp_path / 'new')))
  for n, v in pretrained.flatten_params(tree).items():
    np.testing.assert_array_equal(got[n], v)


def test_orbax_layout(tmp_path):
  """Newer T5X / this project's trainer: orbax PyTree under checkpoint_N/state."""
  import orbax.checkpoint as ocp
  tree = _small_tree(2)
  conditioning = {'prompts': np.ones((2, 3), np.float32)}
  state = {'step': np.array(5, np.int32),
           'params': dict(tree, task_conditioning=conditioning),
           'opt_state': {'count': np.array(5, np.int32)}}
  manager = ocp.CheckpointManager(str(tmp_path), item_names=('state',))
  manager.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
  manager.wait_until_finished()
  step_dir = tmp_path / '5'
  assert not (step_dir / 'checkpoint').exists()
  got = pretrained.flatten_params(pretrained.load_t5x_params(step_dir))
  want = pretrained.flatten_params(state['params'])
  assert got.keys() == want.keys()
  for name in want:
    np.testing.assert_array_equal(got[name], want[name])


def test_ts_spec_paths_resolved_against_checkpoint_dir():
  spec = {'driver': 'zarr',
          'kvstore': {'driver': 'gcs', 'bucket': 't5x-dummy-bucket',
                      'path': 'target.encoder.layers_0.attention.query.kernel'},
          'metadata': {'shape': [8, 12], 'chunks': [8, 12], 'compressor': {'id': 'gzip'},
                       'dtype': 'bfloat16'}}
  on_gcs = pretrained.absolute_ts_spec(spec, 'gs://my-bucket/models/t5_base/checkpoint_1000000')
  assert on_gcs['kvstore'] == {
      'driver': 'gcs', 'bucket': 'my-bucket',
      'path': 'models/t5_base/checkpoint_1000000/target.encoder.layers_0.attention.query.kernel'}
  assert on_gcs['metadata'] == {'shape': [8, 12], 'dtype': 'bfloat16'}
  assert spec['kvstore']['bucket'] == 't5x-dummy-bucket'  # input not mutated
  # A gcs-written checkpoint copied to local disk reads through the file driver.
  local = pretrained.absolute_ts_spec(spec, '/data/checkpoint_1000000')
  assert local['kvstore'] == {
      'driver': 'file',
      'path': '/data/checkpoint_1000000/target.encoder.layers_0.attention.query.kernel'}
  # tensorstore < 0.1.14 kept the path beside the kvstore.
  old = {'driver': 'zarr', 'kvstore': {'driver': 'file'}, 'path': 'target.x', 'metadata': {}}
  assert pretrained.absolute_ts_spec(old, '/c')['kvstore'] == {'driver': 'file',
                                                                 'path': '/c/target.x'}


def test_kvstore_read_used_for_gcs_msgpack(t5x_tiny_checkpoint, tmp_path):
  """gs:// checkpoints are fetched through a tensorstore kvstore; the same call
  through the file driver returns the file's bytes, and None when absent."""
  from hyperprompt_t5x.checkpoints import t5x_format
  directory = str(t5x_tiny_checkpoint.parent) + '/'
  got = t5x_format.read_kvstore_bytes(
      {'driver': 'file', 'path': directory + t5x_tiny_checkpoint.name})
  assert got == t5x_tiny_checkpoint.read_bytes()
  assert t5x_format.read_kvstore_bytes(
      {'driver': 'file', 'path': str(tmp_path) + '/absent'}) is None


# ---------------------------------------------------------------------------
# Bad input: one clear error naming what and where.
# ---------------------------------------------------------------------------


def test_missing_path(tmp_path):
  path = tmp_path / 'nope' / 'checkpoint_3'
  with pytest.raises(CheckpointError, match=str(path)):
    pretrained.load_t5x_params(path)


def test_directory_without_checkpoint_file_names_the_steps(tmp_path):
  (tmp_path / 'checkpoint_100').mkdir()
  with pytest.raises(CheckpointError, match=r'checkpoint_100') as e:
    pretrained.load_t5x_params(tmp_path)
  assert str(tmp_path) in str(e.value)


def test_truncated_checkpoint(t5x_tiny_checkpoint, tmp_path):
  data = t5x_tiny_checkpoint.read_bytes()
  bad = tmp_path / 'checkpoint'
  bad.write_bytes(data[: len(data) // 2])
  with pytest.raises(CheckpointError, match='truncated') as e:
    pretrained.load_t5x_params(bad)
  assert str(bad) in str(e.value)


@pytest.mark.parametrize('content', [
    serialization.msgpack_serialize({'version': 3, 'weights': np.zeros(3)}),
    serialization.msgpack_serialize({'optimizer': {'target': {'vision': np.zeros(3)}}}),
    b'{"not": "msgpack at all"}\n',
])
def test_non_t5_file(tmp_path, content):
  bad = tmp_path / 'checkpoint'
  bad.write_bytes(content)
  with pytest.raises(CheckpointError, match=str(bad)):
    pretrained.load_t5x_params(bad)


def test_missing_tensorstore_array_names_param(tmp_path):
  ckpt = tmp_path / 'checkpoint_7'
  _write_t5x_tensorstore_checkpoint(str(ckpt), _small_tree())
  shutil.rmtree(ckpt / 'target.decoder.logits_dense.kernel')
  with pytest.raises(CheckpointError, match='decoder/logits_dense/kernel') as e:
    pretrained.load_t5x_params(ckpt)
  assert str(ckpt) in str(e.value)


def test_merge_lists_every_missing_wrong_and_unexpected_param():
  fresh = {'token_embedder': {'embedding': np.zeros((10, 4), np.float32)},
           'encoder': {'a': {'kernel': np.zeros((4, 6), np.float32)},
                       'b': {'scale': np.zeros((4,), np.float32)},
                       'c': {'scale': np.zeros((4,), np.float32)}},
           'decoder': {'d': {'kernel': np.zeros((4, 4), np.float32)}},
           'task_conditioning': {'prompts': np.ones((2, 3, 4), np.float32)}}
  ckpt = {'token_embedder': {'embedding': np.ones((10, 4), np.float32)},
          'encoder': {'a': {'kernel': np.ones((4, 5), np.float32)},
                      'extra': {'scale': np.ones((4,), np.float32)}},
          'decoder': {'d': {'kernel': np.ones((4, 3), np.float32)}}}
  with pytest.raises(CheckpointError) as e:
    pretrained.merge_backbone(fresh, ckpt, source='/ckpts/checkpoint_9')
  msg = str(e.value)
  assert '/ckpts/checkpoint_9' in msg
  for name in ('encoder/b/scale', 'encoder/c/scale', 'encoder/a/kernel', 'decoder/d/kernel',
               'encoder/extra/scale'):
    assert name in msg, name
  assert '(4, 5)' in msg and '(4, 6)' in msg
  assert 'task_conditioning' not in msg
  assert 'token_embedder/embedding' not in msg


def test_merge_takes_backbone_from_checkpoint_and_conditioning_fresh():
  fresh = {'params': {'token_embedder': {'embedding': np.zeros((10, 4), np.float32)},
                      'task_conditioning': {'prompts': np.full((2, 3), 5.0, np.float32)}}}
  ckpt = {'token_embedder': {'embedding': np.ones((10, 4), np.float64)},
          'task_conditioning': {'prompts': np.zeros((9,), np.float32)}}
  merged = pretrained.merge_backbone(fresh, ckpt)
  assert set(merged) == {'params'}
  emb = merged['params']['token_embedder']['embedding']
  assert emb.dtype == np.float32 and np.all(emb == 1.0)
  np.testing.assert_array_equal(merged['params']['task_conditioning']['prompts'],
                                np.full((2, 3), 5.0))


def test_mismatched_real_checkpoint_against_other_config(tiny_params, t5x_tiny_checkpoint):
  from hyperprompt_t5x.model import network
  config = pretrained.t5x_config_from_params(
      tiny_params, mlp_dim=20, num_decoder_layers=3, method='none', dtype=jnp.float32)
  with pytest.raises(CheckpointError) as e:
    pretrained.load_pretrained(t5x_tiny_checkpoint, config,
                                fresh_params=network.param_shapes(config))
  msg = str(e.value)
  assert str(t5x_tiny_checkpoint) in msg
  assert 'decoder/layers_2/mlp/wo/kernel' in msg  # missing layer
  assert 'encoder/layers_0/mlp/wi_0/kernel: checkpoint (8, 16), model (8, 20)' in msg
