"""Mesh, logical-axis rules, batch sharding (partitioning.py)."""
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from hyperprompt_t5x import partitioning


def _mesh_axes(rules, *logical):
  return partitioning.logical_to_mesh_axes(P(*logical), rules)


def test_standard_rules_follow_t5x():
  rules = partitioning.standard_logical_axis_rules()
  assert _mesh_axes(rules, 'batch', 'length', 'embed') == P('data', None, None)
  assert _mesh_axes(rules, 'vocab', 'embed') == P('model', None)
  assert _mesh_axes(rules, 'embed', 'mlp') == P(None, 'model')
  assert _mesh_axes(rules, 'embed', 'joined_kv') == P(None, 'model')
  assert _mesh_axes(rules, 'heads', 'relpos_buckets') == P('model', None)
  assert _mesh_axes(rules, 'kv') == P(None)
  # New conditioning axes: replicated by an explicit rule.
  names = dict(rules)
  for axis in ('tasks', 'prompt_len', 'hyper_bottleneck'):
    assert axis in names and names[axis] is None
  # 2-D parameter partitioning: embed goes to data unless data is used already.
  rules2 = partitioning.standard_logical_axis_rules(parameter_partitioning_dims=2)
  assert _mesh_axes(rules2, 'vocab', 'embed') == P('model', 'data')
  assert _mesh_axes(rules2, 'batch', 'embed') == P('data', None)
  # A repeated logical name (square conditioning kernels) maps dim by dim.
  assert _mesh_axes(rules, 'layer_task', 'layer_task') == P(None, None)
  assert _mesh_axes(rules, 'mlp', 'mlp') == P('model', None)
  assert _mesh_axes(rules, 'unknown_axis', 'mlp') == P(None, 'model')
  with pytest.raises(ValueError, match='activation_partitioning_dims'):
    partitioning.standard_logical_axis_rules(activation_partitioning_dims=3)


def test_make_mesh_single_device_and_errors():
  mesh = partitioning.make_mesh(1)
  assert mesh.axis_names == ('data', 'model')
  assert mesh.shape == {'data': len(jax.devices()), 'model': 1}
  with pytest.raises(ValueError, match='divide the device count'):
    partitioning.make_mesh(len(jax.devices()) + 1)
  with pytest.raises(ValueError, match='num_partitions=0'):
    partitioning.make_mesh(0)


def test_shard_batch_single_device_and_bad_batch():
  mesh = partitioning.make_mesh(1)
  batch = {'encoder_input_tokens': np.arange(12, dtype=np.int32).reshape(3, 4),
           'task_ids': np.array([0, 1, 2], np.int32)}
  out = partitioning.shard_batch(batch, mesh)
  np.testing.assert_array_equal(out['encoder_input_tokens'], batch['encoder_input_tokens'])
  assert out['task_ids'].sharding == partitioning.batch_sharding(mesh)
  with pytest.raises(ValueError, match="'x' is a scalar"):
    partitioning.shard_batch({'x': np.int32(1)}, mesh)


def test_maybe_initialize_distributed_is_noop_without_cluster(monkeypatch):
  for var in ('JAX_COORDINATOR_ADDRESS', 'TPU_WORKER_HOSTNAMES', 'SLURM_NTASKS',
              'OMPI_COMM_WORLD_SIZE'):
    monkeypatch.delenv(var, raising=False)
  assert partitioning.maybe_initialize_distributed() is False
  assert not jax.distributed.is_initialized()


_EIGHT_DEVICES = textwrap.dedent('''
  import os
  os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
  import jax, numpy as np
  from jax.sharding import PartitionSpec as P
  from hyperprompt_t5x import partitioning
  assert len(jax.devices()) == 8
  mesh = partitioning.make_mesh(2)
  assert dict(mesh.shape) == {'data': 4, 'model': 2}, mesh.shape
  # The model axis groups consecutive devices.
  assert [d.id for d in mesh.devices[0]] == [0, 1], mesh.devices
  rules = partitioning.standard_logical_axis_rules()
  logical = {'emb': P('vocab', 'embed'), 'odd': P('embed', 'mlp'), 'ln': P('embed')}
  shapes = {'emb': jax.ShapeDtypeStruct((32, 6), 'float32'),
            'odd': jax.ShapeDtypeStruct((6, 5), 'float32'),
            'ln': jax.ShapeDtypeStruct((6,), 'float32')}
  sh = partitioning.logical_to_mesh_sharding(logical, mesh, rules, shapes)
  assert sh['emb'].spec == P('model', None), sh
  assert sh['odd'].spec == P(None, None), sh  # 5 not divisible by 2 -> replicated
  assert sh['ln'].spec == P(None), sh
  x = np.arange(8 * 3).reshape(8, 3).astype(np.int32)
  b = partitioning.shard_batch({'x': x}, mesh)['x']
  assert b.sharding.spec == P('data')
  assert [s.data.shape for s in b.addressable_shards] == [(2, 3)] * 8
  np.testing.assert_array_equal(np.asarray(b), x)
  try:
    partitioning.shard_batch({'x': x[:6]}, mesh)
  except ValueError as e:
    assert 'not divisible by the data axis size 4' in str(e), e
  else:
    raise AssertionError('no error for batch 6 on data=4')
  try:
    partitioning.make_mesh(3)
  except ValueError as e:
    assert 'device count 8' in str(e)
  else:
    raise AssertionError('no error for 3 partitions of 8 devices')
  print('OK')
''')


def test_eight_host_devices_mesh_and_batch_sharding():
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-c', _EIGHT_DEVICES], env=env,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0 and 'OK' in out.stdout, out.stderr[-3000:]


@pytest.mark.parametrize('method', ['share', 'sep', 'global', 'prompt_tuning', 'hyperformer'])
def test_every_param_has_known_distinct_logical_axes(method):
  """flax's axis rules (activation constraints) reject a name repeated in one array."""
  from hyperprompt_t5x.model import network
  config = network.T5Config.from_size('tiny', method=method, num_tasks=3)
  specs = jax.tree_util.tree_leaves(network.param_logical_axes(config),
                                    is_leaf=lambda x: isinstance(x, P))
  known = {name for name, _ in partitioning.standard_logical_axis_rules()}
  assert specs
  for spec in specs:
    names = [n for n in spec if n is not None]
    assert len(names) == len(set(names)), spec
    assert set(names) <= known, (spec, known)
