"""Optimizer state on fine-tuning: reading a checkpoint's Adafactor state and step
(T5X msgpack, this project's orbax TrainState) and restoring it into the optimizer."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import serialization

from hyperprompt_t5x.checkpoints import pretrained
from hyperprompt_t5x.model import network
from hyperprompt_t5x import optim
from hyperprompt_t5x.checkpoints import store as store_lib
from hyperprompt_t5x.run import train_state


def _toy_params(seed=0):
  rng = np.random.default_rng(seed)
  f = lambda *shape: jnp.asarray(0.05 * rng.standard_normal(shape), jnp.float32)  # noqa: E731
  return {
      'token_embedder': {'embedding': f(160, 8)},
      'encoder': {'layers_0': {'mlp': {'wi': {'kernel': f(136, 144)}}},
                  'encoder_norm': {'scale': f(8)}},
      'decoder': {'logits_dense': {'kernel': f(8, 160)}},
      'task_conditioning': {'prompts': f(3, 4, 8)},
  }


def _trained_state(freeze='all', optimizer='adafactor', steps=3):
  params = _toy_params()
  tx = optim.make_optimizer(optimizer, 1e-2, params=params, freeze=freeze)
  state = tx.init(params)
  for step in range(steps):
    grads = jax.tree_util.tree_map(lambda x: x * (step + 1.5) + 0.01, params)  # noqa: B023
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return tx, params, state


def test_real_t5x_checkpoint_holds_adafactor_state_that_fits(t5x_tiny_checkpoint):
  saved = pretrained.load_optimizer_state(t5x_tiny_checkpoint)
  params = pretrained.load_t5x_params(t5x_tiny_checkpoint)
  assert saved.step == 0
  assert sorted(saved.param_states) == sorted(pretrained.flatten_params(params))
  # Every slot fits the optimizer the trainer builds for the inferred model.
  config = pretrained.t5x_config_from_params(params, method='prompt_tuning', num_tasks=2)
  shapes = network.param_shapes(config)
  tx = optim.make_optimizer('adafactor', 1e-3, params=shapes,
                            param_axes=network.param_logical_axes(config))
  fresh = jax.eval_shape(tx.init, shapes)
  state, restored, new = optim.restore_adafactor_state(fresh, saved.step, saved.param_states)
  assert len(restored) == len(saved.param_states)
  assert new == ['task_conditioning/prompts']
  assert int(optim.find_adafactor_state(state).count) == 0


def test_t5x_msgpack_state_round_trip(tmp_path):
  _, params, state = _trained_state()
  ours = optim.find_adafactor_state(state)
  param_states = {name: dict(slots, m=np.zeros((1,), np.float32))
                  for name, slots in optim.flatten_t5x_param_states(ours).items()}
  nested = pretrained.unflatten_params(
      {f'{n}/{k}': np.asarray(v) for n, slots in param_states.items() for k, v in slots.items()})
  (tmp_path / 'checkpoint_3').mkdir()
  (tmp_path / 'checkpoint_3' / 'checkpoint').write_bytes(serialization.msgpack_serialize({
      'version': 3, 'optimizer': {'target': jax.device_get(params),
                                  'state': {'step': np.int32(3), 'param_states': nested}}}))
  saved = pretrained.load_optimizer_state(str(tmp_path / 'checkpoint_3'))
  assert saved.step == 3
  for name, slots in param_states.items():
    for slot, value in slots.items():
      np.testing.assert_array_equal(saved.param_states[name][slot], value)


@pytest.mark.parametrize('freeze', ['all', 'prompts'])
def test_project_checkpoint_state_restores_slot_for_slot(tmp_path, freeze):
  tx, params, state = _trained_state(freeze)
  store = store_lib.CheckpointStore(tmp_path)
  store.save(3, train_state.TrainState(step=jnp.int32(3), params=params, opt_state=state))
  store.wait()
  saved = pretrained.load_optimizer_state(str(tmp_path / 'checkpoint_3'))
  ours = optim.flatten_t5x_param_states(optim.find_adafactor_state(state))
  assert saved.step == 3 and sorted(saved.param_states) == sorted(ours)
  # A fresh optimizer of the full model takes the backbone slots and the step;
  # the conditioning (fresh parameters) keeps fresh slots.
  full = optim.make_optimizer('adafactor', 1e-2, params=params)
  restored_state, restored, fresh = optim.restore_adafactor_state(
      full.init(params), saved.step, saved.param_states)
  got = optim.find_adafactor_state(restored_state)
  backbone = [n for n in ours if not n.startswith('task_conditioning')]
  assert sorted(restored) == sorted(backbone)
  if freeze == 'prompts':  # only the prompts trained: nothing to restore, step stays 0
    assert not backbone and int(got.count) == 0
    return
  assert int(got.count) == 3
  assert fresh == ['task_conditioning/prompts']
  flat = optim.flatten_t5x_param_states(got)
  for name in backbone:
    for slot in ('v_row', 'v_col', 'v'):
      np.testing.assert_array_equal(flat[name][slot], ours[name][slot])
  assert not np.any(flat['task_conditioning/prompts']['v'])


def test_adamw_checkpoint_and_parameters_only_hold_no_adafactor_state(tmp_path):
  _, params, state = _trained_state(optimizer='adamw')
  store = store_lib.CheckpointStore(tmp_path)
  store.save(3, train_state.TrainState(step=jnp.int32(3), params=params, opt_state=state))
  store.wait()
  assert pretrained.load_optimizer_state(str(tmp_path / 'checkpoint_3')) is None
  (tmp_path / 'checkpoint_9').mkdir()
  (tmp_path / 'checkpoint_9' / 'checkpoint').write_bytes(serialization.msgpack_serialize(
      {'version': 3, 'optimizer': {'target': jax.device_get(params)}}))
  assert pretrained.load_optimizer_state(str(tmp_path / 'checkpoint_9')) is None


def test_state_of_another_factoring_is_one_clear_error():
  params = _toy_params()
  tx = optim.make_optimizer('adafactor', 1e-2, params=params)
  name = 'encoder/layers_0/mlp/wi/kernel'  # factored here: v_row [136], v_col [144]
  bad = {name: {'v_row': np.zeros((1,)), 'v_col': np.zeros((1,)), 'v': np.ones((136, 144))}}
  with pytest.raises(ValueError, match=r'ckpt_x: .*wi/kernel/v_row.*RESTORE_OPTIMIZER_STATE'):
    optim.restore_adafactor_state(tx.init(params), 5, bad, source='ckpt_x')
  # No slot of this optimizer in the checkpoint: the state is left as it was.
  state = tx.init(params)
  same, restored, _ = optim.restore_adafactor_state(state, 5, {'other/kernel': {'v': 1}})
  assert same is state and not restored


# The real T5X checkpoint's shapes (docs/METHODS.md, Parameter tree), as tests/training/test_trainer.py binds them.
T5X_TINY = ['T5Config.vocab_size = 32128', 'T5Config.emb_dim = 8', 'T5Config.num_heads = 4',
            'T5Config.head_dim = 3', 'T5Config.num_encoder_layers = 2',
            'T5Config.num_decoder_layers = 2', 'T5Config.mlp_dim = 16']


def _with_trained_state(src, dst, step):
  """The real T5X checkpoint with its Adafactor state set to `step` and non-zero slots."""
  raw = serialization.msgpack_restore(src.read_bytes())
  state = raw['optimizer']['state']
  state['step'] = np.int32(step)
  rng = np.random.default_rng(0)
  flat = pretrained.flatten_params(state['param_states'])
  for key, value in flat.items():
    flat[key] = rng.uniform(0.5, 2.0, np.shape(value)).astype(np.float32)
  state['param_states'] = pretrained.unflatten_params(flat)
  dst.mkdir()
  (dst / 'checkpoint').write_bytes(serialization.msgpack_serialize(raw))
  return flat


def test_fine_tuning_start_restores_or_not_and_says_which(t5x_tiny_checkpoint, tmp_path, capsys):
  from hyperprompt_t5x import gin_config
  from hyperprompt_t5x.run import run_setup
  gin_config.parse(['demo.gin'], macros=[('MODEL_DIR', '/tmp/unused')], bindings=T5X_TINY)
  config = gin_config.model_config()
  flat = _with_trained_state(t5x_tiny_checkpoint, tmp_path / 'checkpoint_1000', 1000)
  path = str(tmp_path / 'checkpoint_1000')
  run = run_setup.build_run(
      model_dir=str(tmp_path / 'run'), config=config, mixture_or_task_name='hyperprompt_demo',
      task_feature_lengths={'inputs': 8, 'targets': 2},
      settings=run_setup.OptimizerSettings(optimizer='adafactor'), initial_checkpoint_path=path)
  line = [l for l in capsys.readouterr().out.splitlines() if l.startswith('Optimizer state')]
  n_backbone = len({k.rsplit('/', 1)[0] for k in flat})
  n_conditioning = len(jax.tree_util.tree_leaves(run.state.params['task_conditioning']))
  assert line == [f'Optimizer state: Adafactor state and step 1000 restored from {path} for '
                  f'{n_backbone} parameters, fresh for {n_conditioning} (task conditioning); '
                  'RESTORE_OPTIMIZER_STATE = False starts it fresh']
  assert run.start_step == 0  # TRAIN_STEPS still counts fine-tuning steps from 0
  restored = optim.find_adafactor_state(jax.device_get(run.state.opt_state))
  assert int(restored.count) == 1000
  slots = optim.flatten_t5x_param_states(restored)
  name = 'encoder/layers_0/attention/query/kernel'
  np.testing.assert_array_equal(slots[name]['v'], flat[f'{name}/v'])
  assert not any(np.any(s['v']) for n, s in slots.items() if n.startswith('task_conditioning'))
  # The switch, and a checkpoint without optimizer state: the optimizer starts fresh.
  params_only = tmp_path / 'weights_only'
  params_only.mkdir()
  raw = serialization.msgpack_restore((tmp_path / 'checkpoint_1000' / 'checkpoint').read_bytes())
  del raw['optimizer']['state']
  (params_only / 'checkpoint').write_bytes(serialization.msgpack_serialize(raw))
  for where, enabled, says in ((path, False, 'RESTORE_OPTIMIZER_STATE = False'),
                               (str(params_only), True, 'holds no Adafactor state')):
    same = run_setup.restore_optimizer_state(run.state, run.shardings, where, enabled)
    assert same is run.state
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith('Optimizer state: fresh (') and says in out[0]
