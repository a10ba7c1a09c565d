"""Train state, sharded train step, freeze modes, orbax checkpoints (train_state.py).

Multi-device and multi-process runs happen in subprocesses (tests/step_helpers.py)
because JAX's device set-up is fixed once per process.
"""
import hashlib
import json
import os
import pathlib
import resource
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from hyperprompt_t5x.model import models
from hyperprompt_t5x import optim, partitioning
from hyperprompt_t5x.checkpoints import errors
from hyperprompt_t5x.checkpoints import store as store_lib
from hyperprompt_t5x.run import train_state
import step_helpers  # tests/ is on sys.path under pytest (rootdir conftest)
from conftest import FAST_XLA_FLAGS as FAST_XLA  # these subprocesses check numerics; compile dominates

HELPER = pathlib.Path(step_helpers.__file__).resolve()


def _env(**extra):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(HELPER.parents[1]))
  for k in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'):
    env.pop(k, None)
  env.update(extra)
  return env


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_data4_model2_mesh_matches_one_device(tmp_path):
  """5 steps of HyperPrompt-Global (float32, dropout 0.1) on 8 host devices vs 1.

  Tolerance: losses rtol 1e-5, final params max |diff| 1e-5 (float32 reductions
  run in another order when sharded; observed ~5e-7).
  """
  out = tmp_path / 'sharding.json'
  proc = subprocess.run(
      [sys.executable, str(HELPER), 'sharding', str(out)],
      env=_env(XLA_FLAGS=f'--xla_force_host_platform_device_count=8 {FAST_XLA}'),
      capture_output=True, text=True, timeout=400)
  assert proc.returncode == 0, proc.stderr[-4000:]
  r = json.loads(out.read_text())
  assert r['mesh'] == {'data': 4, 'model': 2}
  # Parameters really are sharded on the model axis.
  assert r['specs']['encoder/layers_0/mlp/wi_0/kernel'] == "P(None, 'model')"
  assert r['specs']['token_embedder/embedding'] == "P('model', None)"
  assert len(r['losses8']) == 5 and len(set(r['losses8'])) > 1
  np.testing.assert_allclose(r['losses8'], r['losses1'], rtol=1e-5)
  assert r['param_diff'] < 1e-5


def test_two_processes_agree_with_each_other_and_one_process(tmp_path):
  """jax.distributed on localhost (gloo), 2 processes x 2 devices, each feeding
  half of every batch, vs one process with 4 devices and the full batches;
  then a multi-process orbax save / restore."""
  port = _free_port()
  procs = []
  for i in range(2):
    env = _env(XLA_FLAGS=f'--xla_force_host_platform_device_count=2 {FAST_XLA}',
               JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}', JAX_NUM_PROCESSES='2',
               JAX_PROCESS_ID=str(i))
    procs.append(subprocess.Popen([sys.executable, str(HELPER), 'process',
                                   str(tmp_path / f'p{i}.json')], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  ref = subprocess.Popen(
      [sys.executable, str(HELPER), 'process', str(tmp_path / 'ref.json')],
      env=_env(XLA_FLAGS=f'--xla_force_host_platform_device_count=4 {FAST_XLA}'),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    errors = [p.communicate(timeout=300)[1] for p in procs + [ref]]
  finally:
    for p in procs + [ref]:
      if p.poll() is None:
        p.kill()
  for p, err in zip(procs + [ref], errors):
    assert p.returncode == 0, err[-4000:]
  r0, r1, rr = (json.loads((tmp_path / f).read_text()) for f in ('p0.json', 'p1.json',
                                                                   'ref.json'))
  assert r0['distributed'] and r0['process_count'] == 2 and r0['devices'] == 4
  assert not rr['distributed'] and rr['process_count'] == 1
  assert r0['losses'] == r1['losses'] and r0['checksum'] == r1['checksum']
  np.testing.assert_allclose(r0['losses'], rr['losses'], rtol=1e-5)
  np.testing.assert_allclose(r0['checksum'], rr['checksum'], rtol=1e-5)
  # Both processes wrote their shards of one orbax checkpoint and read it back.
  for r in (r0, r1, rr):
    assert r['restore_equal'] and r['extra'] == {'data_batches': 3}
  assert (tmp_path / 'ckpt_2_processes' / 'checkpoint_3').is_dir()


# -- in-process: one device -------------------------------------------------------

@pytest.fixture(scope='module')
def setup():
  model = models.EncoderDecoderModel(step_helpers.tiny_config('global'), z_loss=1e-4)
  params = step_helpers.numpy_params(model, seed=0)
  mesh = partitioning.make_mesh(1)
  rules = partitioning.standard_logical_axis_rules()
  return model, params, mesh, rules


def _run(setup, freeze, steps, batches, lr=1e-2, name='adafactor'):
  model, params, mesh, rules = setup
  schedule = optim.make_schedule('constant', lr)
  tx = optim.make_optimizer(name, schedule, params=params, freeze=freeze)
  state, shardings = train_state.create_train_state(
      model, tx, jax.random.PRNGKey(0), mesh, rules, step_helpers.INPUT_LEN,
      step_helpers.TARGET_LEN, initial_params=params)
  step = train_state.make_train_step(model, tx, mesh, shardings, freeze=freeze,
                                     schedule=schedule)
  losses = []
  for i in range(steps):
    state, metrics = step(state, partitioning.shard_batch(batches[i % len(batches)], mesh))
    losses.append(metrics['loss'])
  return state, shardings, [float(x) for x in jax.device_get(losses)], metrics, tx


def _leaves_by_path(tree):
  return {'/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))))
                   for k in p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope='module')
def overfit(setup):
  """25 Adafactor steps on one tiny batch; reused by the checkpoint and eval tests."""
  batch = step_helpers.make_batch(11, batch=4)
  state, shardings, losses, metrics, tx = _run(setup, 'all', 25, [batch], lr=3e-2)
  return state, shardings, losses, metrics, batch


def test_overfits_a_tiny_batch(overfit):
  state, _, losses, metrics, _ = overfit
  assert losses[-1] < 0.5 * losses[0], losses
  assert int(state.step) == 25
  assert float(metrics['learning_rate']) == pytest.approx(3e-2)
  assert np.isfinite(float(metrics['grad_norm'])) and float(metrics['grad_norm']) > 0


@pytest.mark.parametrize('freeze,trained_prefix', [
    ('conditioning', 'task_conditioning/'), ('prompts', 'task_conditioning/prompts')])
def test_freeze_modes_keep_frozen_params_bit_identical(setup, freeze, trained_prefix):
  _, params, _, _ = setup
  batches = [step_helpers.make_batch(s) for s in range(3)]
  state, _, losses, _, _ = _run(setup, freeze, 3, batches)
  before = _leaves_by_path(params)
  after = _leaves_by_path(jax.device_get(state.params))
  assert before.keys() == after.keys()
  trained = [k for k in before if k.startswith(trained_prefix)]
  assert trained and len(trained) < len(before)
  for k in before:
    if k.startswith(trained_prefix):
      assert not np.array_equal(before[k], after[k]), f'{k} did not train'
    else:
      assert np.array_equal(before[k], after[k]), f'frozen {k} changed'
      assert before[k].tobytes() == np.asarray(after[k]).tobytes()
  # The optimizer state holds nothing for frozen parameters.
  state_paths = list(_leaves_by_path(state.opt_state))
  assert state_paths
  frozen_names = [k for k in before if not k.startswith(trained_prefix)]
  for sp in state_paths:
    assert not any(sp.endswith(f) for f in frozen_names), sp
  assert any(sp.endswith(trained[0]) for sp in state_paths)


def _dir_digest(path):
  digest = {}
  for f in sorted(pathlib.Path(path).rglob('*')):
    if f.is_file():
      digest[str(f.relative_to(path))] = hashlib.sha256(f.read_bytes()).hexdigest()
  return digest


@pytest.fixture(scope='module')
def trained(overfit):
  """A trained state (non-trivial optimizer state) and its shardings."""
  return overfit[0], overfit[1]


def test_checkpoint_round_trip_keep_n_and_no_overwrite(trained, tmp_path):
  state, shardings = trained
  store = store_lib.CheckpointStore(tmp_path, keep=2)
  assert store.latest_step() is None
  extra = {'data_batches': 2, 'fingerprint': 'abc', 'nested': {'x': [1, 2]}}
  for step in (1, 2, 3):
    store.save(step, state, dict(extra, step=step))
  assert store.all_steps() == [2, 3] and store.latest_step() == 3
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith('checkpoint_')) == [
      'checkpoint_2', 'checkpoint_3']
  target = train_state.abstract_with_shardings(
      jax.eval_shape(lambda s: s, state), shardings)
  restored, got_extra = store.restore(3, target)
  assert got_extra == dict(extra, step=3)
  a, b = _leaves_by_path(jax.device_get(state)), _leaves_by_path(jax.device_get(restored))
  assert a.keys() == b.keys() and len(a) > 10
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(state)
  for x, s in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(shardings)):
    assert x.sharding == s
  # A concrete state works as the target too (its shardings are used); a fresh
  # store (a restarted process) reads the same directory.
  again, _ = store_lib.CheckpointStore(tmp_path, create=False).restore(2, state)
  assert int(again.step) == int(state.step)
  np.testing.assert_array_equal(again.params['task_conditioning']['prompts'],
                                state.params['task_conditioning']['prompts'])
  with pytest.raises(FileNotFoundError, match='does not exist'):
    store_lib.CheckpointStore(tmp_path / 'missing', create=False)
  before = _dir_digest(tmp_path)
  with pytest.raises(errors.CheckpointError, match='already exists'):
    store.save(3, state, {})
  with pytest.raises(TypeError, match='JSON'):
    store.save(4, state, {'bad': object()})
  assert _dir_digest(tmp_path) == before


def test_restore_from_a_different_model_is_one_clear_error(trained, setup, tmp_path):
  state, _ = trained
  store = store_lib.CheckpointStore(tmp_path)
  store.save(2, state, {})
  before = _dir_digest(tmp_path)
  # Same family, 4 tasks instead of 3: conditioning tables differ in shape.
  other = models.EncoderDecoderModel(step_helpers.tiny_config('global', num_tasks=4))
  mesh, rules = setup[2], setup[3]
  other_tx = optim.make_optimizer('adafactor', 1e-3,
                                  params=other.init_abstract(1, 8, 4)['params'])
  abstract, shardings = train_state.state_shardings_for(other, other_tx, mesh, rules, 8, 4)
  with pytest.raises(errors.CheckpointMismatchError) as info:
    store_lib.CheckpointStore(tmp_path).restore(
        2, train_state.abstract_with_shardings(abstract, shardings))
  msg = str(info.value)
  assert str(tmp_path / 'checkpoint_2') in msg
  assert 'params/task_conditioning/prompts' in msg and '(3, 2, 16)' in msg
  # Another method: whole subtrees missing / unexpected.
  share = models.EncoderDecoderModel(step_helpers.tiny_config('share'))
  share_tx = optim.make_optimizer('adafactor', 1e-3,
                                  params=share.init_abstract(1, 8, 4)['params'])
  abstract, shardings = train_state.state_shardings_for(share, share_tx, mesh, rules, 8, 4)
  with pytest.raises(errors.CheckpointMismatchError, match='missing .*key_down'):
    store_lib.CheckpointStore(tmp_path).restore(
        2, train_state.abstract_with_shardings(abstract, shardings))
  assert _dir_digest(tmp_path) == before
  with pytest.raises(errors.CheckpointError, match='no checkpoint for step 7'):
    store_lib.CheckpointStore(tmp_path).restore(7, state)


def test_truncated_checkpoint_is_one_clear_error(trained, tmp_path):
  state, shardings = trained
  store = store_lib.CheckpointStore(tmp_path)
  store.save(5, state, {'data_batches': 5})
  ckpt = tmp_path / 'checkpoint_5'
  data_files = [f for f in ckpt.rglob('*') if f.is_file() and '/d/' in str(f)]
  assert data_files
  for f in data_files:  # Cut every array data file in half.
    f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])
  before = _dir_digest(tmp_path)
  target = train_state.abstract_with_shardings(jax.eval_shape(lambda s: s, state), shardings)
  with pytest.raises(errors.CheckpointCorruptError, match=str(ckpt)):
    store_lib.CheckpointStore(tmp_path).restore(5, target)
  assert _dir_digest(tmp_path) == before
  # Damaged metadata as well.
  (ckpt / 'state' / '_METADATA').write_text('{not json')
  with pytest.raises(errors.CheckpointCorruptError, match=str(ckpt)):
    store_lib.CheckpointStore(tmp_path).restore(5, target)


def _target_of(trained):
  state, shardings = trained
  return train_state.abstract_with_shardings(jax.eval_shape(lambda s: s, state), shardings)


def test_damaged_checkpoint_is_named_and_moved_aside_whole(trained, tmp_path):
  state, _ = trained
  store = store_lib.CheckpointStore(tmp_path)
  store.save(1, state, {'data_batches': 1})
  store.save(2, state, {'data_batches': 2})
  victim = max((f for f in (tmp_path / 'checkpoint_2').rglob('*') if f.is_file()),
               key=lambda f: f.stat().st_size)
  name = str(victim.relative_to(tmp_path / 'checkpoint_2'))
  size = victim.stat().st_size
  victim.write_bytes(victim.read_bytes()[:100])
  damaged_files = _dir_digest(tmp_path / 'checkpoint_2')
  with pytest.raises(errors.CheckpointCorruptError) as e:
    store.restore(2, _target_of(trained))
  assert str(e.value) == (f'checkpoint {tmp_path / "checkpoint_2"} is damaged: file {name} '
                          f'is truncated (100 of {size} bytes)')
  assert store.move_aside(2) == tmp_path / 'damaged' / 'checkpoint_2'
  assert _dir_digest(tmp_path / 'damaged' / 'checkpoint_2') == damaged_files  # moved, not lost
  assert store.all_steps() == [1]
  _, extra = store.restore(1, _target_of(trained))
  assert extra['data_batches'] == 1
  store.save(2, state, {'data_batches': 2})  # the resumed run writes step 2 again
  (tmp_path / 'checkpoint_2' / 'extra' / 'metadata').unlink()
  with pytest.raises(errors.CheckpointCorruptError, match='file extra/metadata is missing'):
    store.restore(2, _target_of(trained))
  assert store.move_aside(2) == tmp_path / 'damaged' / 'checkpoint_2.1'


def test_failed_save_is_one_clear_error_and_keeps_the_previous(trained, tmp_path):
  """A write that fails (here: a file-size limit, as a full disk would) stops with one
  line; the half-written checkpoint is gone, the previous one intact and restorable."""
  state, _ = trained
  store = store_lib.CheckpointStore(tmp_path)
  store.save(1, state, {'data_batches': 1})
  before = _dir_digest(tmp_path)
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
  try:
    with pytest.raises(errors.CheckpointSaveError) as e:
      store.save(2, state, {'data_batches': 2})
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, previous_handler)
  message = str(e.value)
  assert len(message.splitlines()) == 1, message
  assert f'could not write checkpoint {tmp_path / "checkpoint_2"}: file too large' in message
  assert f'the previous checkpoint {tmp_path / "checkpoint_1"} is intact' in message
  assert _dir_digest(tmp_path) == before  # no partial checkpoint_2 left behind
  _, extra = store_lib.CheckpointStore(tmp_path).restore(1, _target_of(trained))
  assert extra['data_batches'] == 1


def test_eval_step_matches_train_loss_and_scores(overfit, setup):
  _, shardings, losses, _, batch = overfit
  model, params, mesh, _ = setup
  eval_fn = train_state.make_eval_step(model, mesh, shardings.params)
  # The first train step reported the loss of the initial params on this batch
  # (dropout is off in the tiny config).
  metrics = jax.device_get(eval_fn(params, partitioning.shard_batch(batch, mesh)))
  np.testing.assert_allclose(metrics['loss'], losses[0], rtol=1e-5)
  # Scores: per-example weighted log-likelihoods; with z_loss=1e-4 and no label
  # smoothing, -sum(scores)/tokens is the cross-entropy part of the loss.
  assert metrics['scores'].shape == (4,) and np.all(metrics['scores'] < 0)
  np.testing.assert_allclose(-metrics['scores'].sum() / metrics['num_tokens'],
                             metrics['cross_ent_loss'], rtol=1e-5)


def test_create_train_state_rejects_wrong_initial_params(setup):
  model, params, mesh, rules = setup
  tx = optim.make_optimizer('adafactor', 1e-3, params=params)
  bad = jax.tree_util.tree_map(lambda x: x, params)
  bad['token_embedder']['embedding'] = np.zeros((3, 3), np.float32)
  del bad['task_conditioning']['prompts']
  with pytest.raises(ValueError, match=r'initial_params does not fit the model.*prompts.*embedding'):
    train_state.create_train_state(model, tx, jax.random.PRNGKey(0), mesh, rules, 8, 4,
                                   initial_params=bad)


def test_predict_fn_decodes_greedily_with_shardings(overfit, setup):
  """The jitted, sharded prediction: int32 [batch, len]; its first token is the
  argmax of the teacher-forced logits at position 0 (cached decoding itself is
  checked against teacher forcing in test_decoding.py)."""
  state, shardings, _, _, batch = overfit
  model, _, mesh, _ = setup
  predict = train_state.make_predict_fn(model, mesh, shardings.params, max_decode_length=3)
  tokens = jax.device_get(predict(state.params, partitioning.shard_batch(batch, mesh)))
  assert tokens.shape == (4, 3) and tokens.dtype == np.int32
  logits = jax.jit(model._logits)(state.params, batch, None)  # pylint: disable=protected-access
  np.testing.assert_array_equal(tokens[:, 0], np.asarray(logits[:, 0].argmax(-1)))
