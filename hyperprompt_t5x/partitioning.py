"""A ('data', 'model') device mesh and T5X's logical-axis rules (jax.sharding).

Parameters carry flax logical axis names (`embed`, `mlp`, `heads`, ...). The
rules below map them to mesh axes the way T5X's
`standard_logical_axis_rules()` does: batch on `data`, the wide model
dimensions (vocab, mlp, heads, joined_kv) on `model`, the rest replicated.
The new task-conditioning axes (`tasks`, `prompt_len`, `task_embed`,
`layer_task`, `hyper_*`) are small and replicated.

Multi-host: call `maybe_initialize_distributed()` before any JAX backend
starts; every process then feeds its own slice of the global batch to
`shard_batch`.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ('data', 'model')
LogicalRules = Sequence[tuple[str, Optional[str | tuple[str, ...]]]]

# Logical names used by task-conditioning parameters (conditioning.py). All
# small, so replicated; a rule must exist for each so the mapping is explicit.
CONDITIONING_AXES = (
    'tasks', 'prompt_len', 'task_embed', 'layer_task', 'layer_task_hidden', 'hyper_blocks',
    'hyper_bottleneck', 'hyper_generated', 'hyper_layers', 'hyper_positions', 'layers', 'stack')


def standard_logical_axis_rules(
    activation_partitioning_dims: int = 1,
    parameter_partitioning_dims: int = 1,
    additional_rules: Optional[LogicalRules] = None) -> list:
  """T5X's standard logical -> mesh axis rules, plus the conditioning axes.

  activation_partitioning_dims=2 also shards activations' `embed` on `model`;
  parameter_partitioning_dims=2 also shards parameters' `embed` on `data`
  (2-D, ZeRO-3-like), as in T5X. `additional_rules` go first and win.
  """
  if activation_partitioning_dims not in (1, 2):
    raise ValueError(f'activation_partitioning_dims must be 1 or 2, got '
                     f'{activation_partitioning_dims}')
  if parameter_partitioning_dims not in (1, 2):
    raise ValueError(f'parameter_partitioning_dims must be 1 or 2, got '
                     f'{parameter_partitioning_dims}')
  rules = [
      ('batch', 'data'),
      ('vocab', 'model'),
      ('mlp', 'model'),
      ('heads', 'model'),
      ('kv', None),
      ('joined_kv', 'model'),
      ('relpos_buckets', None),
      ('abspos_buckets', None),
      ('length', None),
      ('mlp_activations', None),
  ]
  if activation_partitioning_dims == 2:
    rules.append(('embed', 'model'))
  if parameter_partitioning_dims == 2:
    rules.append(('embed', 'data'))
  rules.append(('embed', None))
  rules.extend((name, None) for name in CONDITIONING_AXES)
  return list(additional_rules or ()) + rules


def make_mesh(num_partitions: int = 1, devices: Optional[Sequence[Any]] = None) -> Mesh:
  """A ('data', 'model') mesh: `num_partitions` devices on `model`, the rest on `data`.

  Devices are laid out as T5X does: consecutive devices (those of one host
  first) share a model-parallel group, so model-axis collectives stay local.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if num_partitions < 1 or n % num_partitions:
    raise ValueError(f'num_partitions={num_partitions} must be >= 1 and divide the '
                     f'device count {n}')
  shape = (n // num_partitions, num_partitions)
  try:
    from jax.experimental import mesh_utils
    grid = mesh_utils.create_device_mesh(shape, devices)
  except (ValueError, NotImplementedError, AssertionError):
    # Topology-aware layout unavailable (e.g. CPU/GPU processes): plain order.
    grid = np.asarray(devices, dtype=object).reshape(shape)
  return Mesh(grid, MESH_AXES)


def logical_to_mesh_axes(logical: PartitionSpec, rules: LogicalRules) -> PartitionSpec:
  """One logical PartitionSpec -> mesh PartitionSpec (flax's rule semantics).

  Each dimension takes the first rule for its name whose mesh axes are not
  used by an earlier dimension; a name without a usable rule is replicated.
  Unlike flax, a logical name may repeat (e.g. a square [layer_task,
  layer_task] kernel).
  """
  used, out = set(), []
  for name in logical:
    assigned = None
    names = name if isinstance(name, tuple) else (name,)
    if name is not None and len(names) == 1:
      for rule_name, mesh_axis in rules:
        if rule_name != names[0]:
          continue
        axes = () if mesh_axis is None else (
            mesh_axis if isinstance(mesh_axis, tuple) else (mesh_axis,))
        if not used.intersection(axes):
          assigned = mesh_axis
          used.update(axes)
          break
    out.append(assigned)
  return PartitionSpec(*out)


def _replicate_undivisible(spec: PartitionSpec, shape, mesh: Mesh) -> PartitionSpec:
  """Drops sharding on dimensions the mesh axes do not divide evenly."""
  out = []
  for i, axis in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axis is None:
      out.append(None)
      continue
    names = axis if isinstance(axis, tuple) else (axis,)
    size = int(np.prod([mesh.shape[a] for a in names]))
    out.append(axis if shape[i] % size == 0 else None)
  return PartitionSpec(*out)


def logical_to_mesh_sharding(logical_axes_tree, mesh: Mesh, rules: LogicalRules,
                             shapes=None):
  """Maps a pytree of logical PartitionSpecs to NamedShardings on `mesh`.

  Unknown logical names are replicated (flax's rule). If `shapes` (a matching
  tree of arrays or ShapeDtypeStructs) is given, a dimension that its mesh
  axes do not divide is replicated instead of failing at placement time.
  """
  is_spec = lambda x: isinstance(x, PartitionSpec)
  mesh_specs = jax.tree_util.tree_map(
      lambda s: logical_to_mesh_axes(s, rules), logical_axes_tree, is_leaf=is_spec)
  if shapes is not None:
    mesh_specs = jax.tree_util.tree_map(
        lambda s, x: _replicate_undivisible(s, x.shape, mesh), mesh_specs, shapes,
        is_leaf=is_spec)
  return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), mesh_specs,
                                is_leaf=is_spec)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension on `data`, the rest replicated (any rank)."""
  return NamedSharding(mesh, PartitionSpec('data'))


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict:
  """Host arrays -> global jax.Arrays sharded on `data`.

  Each process passes only its own rows (its slice of the global batch, in
  process order); the global batch is the concatenation over processes.
  Single-process this is a sharded `device_put` of the whole batch.
  """
  sharding = batch_sharding(mesh)
  data_size = mesh.shape['data']
  out = {}
  for name, value in batch.items():
    value = np.asarray(value)
    if value.ndim == 0:
      raise ValueError(f'batch feature {name!r} is a scalar; every feature needs a '
                       'leading batch dimension')
    global_rows = value.shape[0] * jax.process_count()
    if global_rows % data_size:
      raise ValueError(
          f'batch feature {name!r}: global batch {global_rows} '
          f'({value.shape[0]} rows x {jax.process_count()} processes) is not divisible '
          f'by the data axis size {data_size}')
    out[name] = jax.make_array_from_process_local_data(
        sharding, value, (global_rows,) + value.shape[1:])
  return out


def _env_int(name: str) -> Optional[int]:
  value = os.environ.get(name)
  return int(value) if value not in (None, '') else None


def maybe_initialize_distributed() -> bool:
  """Calls `jax.distributed.initialize()` when the environment is multi-process.

  Triggers: JAX_COORDINATOR_ADDRESS (with JAX_NUM_PROCESSES and JAX_PROCESS_ID)
  set explicitly; or a cluster JAX auto-detects with more than one process
  (multi-host TPU VM slices via TPU_WORKER_HOSTNAMES, SLURM_NTASKS > 1,
  OMPI_COMM_WORLD_SIZE > 1). Otherwise a no-op. Selects gloo for CPU
  collectives. Must run before any JAX backend is used. Returns True when
  distributed mode is (now) on.
  """
  if jax.distributed.is_initialized():
    return True
  coordinator = os.environ.get('JAX_COORDINATOR_ADDRESS')
  kwargs = {}
  if coordinator:
    kwargs = dict(coordinator_address=coordinator,
                  num_processes=_env_int('JAX_NUM_PROCESSES'),
                  process_id=_env_int('JAX_PROCESS_ID'))
  else:
    tpu_hosts = [h for h in os.environ.get('TPU_WORKER_HOSTNAMES', '').split(',') if h]
    cluster = (len(tpu_hosts) > 1 or (_env_int('SLURM_NTASKS') or 1) > 1
               or (_env_int('OMPI_COMM_WORLD_SIZE') or 1) > 1)
    if not cluster:
      return False
  # CPU computations across processes need a collectives implementation; gloo
  # touches only the CPU backend, so it is harmless on GPU/TPU hosts.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  logging.info('jax.distributed.initialize(%s)', kwargs)
  jax.distributed.initialize(**kwargs)
  return True
