"""Shared pieces for the step tests: a tiny config, batches, cheap parameters.

Also runnable as a worker script (subprocesses that need their own JAX
device set-up): `python tests/step_helpers.py sharding OUT.json` (8 host
devices) and `python tests/step_helpers.py process OUT.json` (one process of
a jax.distributed run, configured by the JAX_* environment variables).
"""
import json
import os
import sys

import numpy as np

INPUT_LEN, TARGET_LEN, NUM_TASKS, VOCAB = 8, 4, 3, 64


def tiny_config(method='global', **overrides):
  import jax.numpy as jnp
  from hyperprompt_t5x.model import network
  # One encoder and one decoder layer: XLA's CPU compile time dominates these tests.
  kwargs = dict(method=method, num_tasks=NUM_TASKS, dtype=jnp.float32, dropout_rate=0.0,
                num_encoder_layers=1, num_decoder_layers=1,
                prompt_length=2, bottleneck=4, task_embed_dim=4, layer_task_dim=4)
  kwargs.update(overrides)
  return network.T5Config.from_size('tiny', **kwargs)


def make_batch(seed, batch=8, input_len=INPUT_LEN, target_len=TARGET_LEN, vocab=VOCAB,
               num_tasks=NUM_TASKS):
  """A random batch with padding at the ends of rows (T5X features + task_ids)."""
  rng = np.random.default_rng(seed)
  enc = rng.integers(2, vocab, (batch, input_len)).astype(np.int32)
  tgt = rng.integers(2, vocab, (batch, target_len)).astype(np.int32)
  for i in range(batch):  # Variable lengths: pad the tails.
    enc[i, rng.integers(input_len // 2, input_len + 1):] = 0
    tgt[i, rng.integers(1, target_len + 1):] = 0
  dec_in = np.concatenate([np.zeros((batch, 1), np.int32), tgt[:, :-1]], axis=1)
  return {
      'encoder_input_tokens': enc,
      'decoder_input_tokens': dec_in,
      'decoder_target_tokens': tgt,
      'decoder_loss_weights': (tgt > 0).astype(np.float32),
      'task_ids': rng.integers(0, num_tasks, (batch,)).astype(np.int32),
  }


def numpy_params(model, seed=0, input_len=INPUT_LEN, target_len=TARGET_LEN):
  """Host float32 params of the model's shapes, fan-in scaled (no init compile)."""
  import jax
  shapes = model.init_abstract(1, input_len, target_len)['params']
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    name = str(getattr(path[-1], 'key', path[-1]))
    if name == 'scale':
      return np.ones(s.shape, np.float32)
    fan_in = s.shape[-2] if len(s.shape) >= 2 else 1
    return (rng.normal(size=s.shape) / np.sqrt(fan_in)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(leaf, shapes)


def _tree_max_abs_diff(a, b):
  import jax
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def _train(model, optimizer, mesh, rules, batches, *, initial_params=None, seed=0,
           freeze='all'):
  import jax
  from hyperprompt_t5x import partitioning
  from hyperprompt_t5x.run import train_state
  state, shardings = train_state.create_train_state(
      model, optimizer, jax.random.PRNGKey(seed), mesh, rules, INPUT_LEN, TARGET_LEN,
      initial_params=initial_params)
  start_params = jax.device_get(state.params)
  step = train_state.make_train_step(model, optimizer, mesh, shardings, freeze=freeze)
  losses = []
  for batch in batches:
    state, metrics = step(state, partitioning.shard_batch(batch, mesh), jax.random.PRNGKey(7))
    losses.append(metrics['loss'])
  return start_params, [float(l) for l in jax.device_get(losses)], state


def _model_and_optimizer(config):
  from hyperprompt_t5x.model import models
  from hyperprompt_t5x import optim
  model = models.EncoderDecoderModel(config, z_loss=1e-4, label_smoothing=0.1)
  abstract = model.init_abstract(1, INPUT_LEN, TARGET_LEN)['params']
  optimizer = optim.make_optimizer('adafactor', optim.make_schedule('constant', 1e-2),
                                   params=abstract)
  return model, optimizer


def sharding_worker(out_path):
  """8 host devices: data=4 x model=2 vs one device, same params and batches."""
  import jax
  from hyperprompt_t5x import partitioning
  assert len(jax.devices()) == 8, jax.devices()
  model, optimizer = _model_and_optimizer(tiny_config('global', dropout_rate=0.1))
  rules = partitioning.standard_logical_axis_rules()
  batches = [make_batch(s) for s in range(5)]
  mesh8 = partitioning.make_mesh(2)
  # Sharded run: params initialised directly sharded by the jitted init.
  init8, losses8, state8 = _train(model, optimizer, mesh8, rules, batches)
  specs = {'/'.join(str(getattr(k, 'key', k)) for k in p): str(x.sharding.spec)
           for p, x in jax.tree_util.tree_flatten_with_path(state8.params)[0]}
  mesh1 = partitioning.make_mesh(1, devices=jax.devices()[:1])
  _, losses1, state1 = _train(model, optimizer, mesh1, rules, batches,
                              initial_params=init8)
  result = dict(losses8=losses8, losses1=losses1,
                param_diff=_tree_max_abs_diff(jax.device_get(state8.params),
                                              jax.device_get(state1.params)),
                mesh=dict(mesh8.shape), specs=specs)
  with open(out_path, 'w') as f:
    json.dump(result, f)


def process_worker(out_path):
  """One process of a jax.distributed CPU run (or the single-process reference)."""
  from hyperprompt_t5x import partitioning
  distributed = partitioning.maybe_initialize_distributed()
  import jax
  model, optimizer = _model_and_optimizer(tiny_config('global'))
  rules = partitioning.standard_logical_axis_rules()
  mesh = partitioning.make_mesh(2)
  n, i = jax.process_count(), jax.process_index()
  full = [make_batch(s) for s in range(3)]
  rows = full[0]['task_ids'].shape[0] // n
  local = [{k: v[i * rows:(i + 1) * rows] for k, v in b.items()} for b in full]
  _, losses, state = _train(model, optimizer, mesh, rules, local,
                            initial_params=numpy_params(model, seed=3))
  from jax.experimental import multihost_utils
  params = multihost_utils.process_allgather(state.params, tiled=True)
  checksum = float(sum(np.sum(np.abs(np.asarray(x))) for x in jax.tree_util.tree_leaves(params)))
  # Every process writes its shards of one orbax checkpoint, then reads it back.
  from hyperprompt_t5x.run import train_state
  from hyperprompt_t5x.checkpoints import store as store_lib
  ckpt_dir = os.path.join(os.path.dirname(out_path), 'ckpt_%d_processes' % n)
  store = store_lib.CheckpointStore(ckpt_dir, keep=1)
  store.save(3, state, {'data_batches': 3})
  target = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  restored, extra = store.restore(store.latest_step(), target)
  back = multihost_utils.process_allgather(restored.params, tiled=True)
  restore_equal = all(np.array_equal(a, b) for a, b in zip(
      jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(back)))
  with open(out_path, 'w') as f:
    json.dump(dict(losses=losses, checksum=checksum, process_count=n, distributed=distributed,
                   devices=len(jax.devices()), mesh=dict(mesh.shape),
                   restore_equal=restore_equal, extra=extra), f)
  if distributed:
    jax.distributed.shutdown()


if __name__ == '__main__':
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  {'sharding': sharding_worker, 'process': process_worker}[sys.argv[1]](sys.argv[2])
