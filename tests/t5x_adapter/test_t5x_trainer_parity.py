"""The lean trainer's step and T5X's (`t5x.trainer.train_with_lr`) take the same steps.

Same initial parameters, batches and no dropout; each side its own default
optimizer (the project's Adafactor, T5X's `adafactor.Adafactor` with the
factor rules of gin/t5x/model.gin) at a constant learning rate 1e-3.
"""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

try:
  import t5x  # noqa: F401  pylint: disable=unused-import
except ImportError:
  pytest.skip('t5x not importable (install it with scripts/install_t5x.sh)',
              allow_module_level=True)

import seqio  # noqa: E402
from t5x import adafactor  # noqa: E402
from t5x import train_state as t5x_train_state  # noqa: E402
from t5x import trainer as t5x_trainer  # noqa: E402

from hyperprompt_t5x.model import models  # noqa: E402
from hyperprompt_t5x.model import network  # noqa: E402
from hyperprompt_t5x import optim  # noqa: E402
from hyperprompt_t5x import partitioning  # noqa: E402
from hyperprompt_t5x.t5x_adapter import t5x_model  # noqa: E402
from hyperprompt_t5x.run import train_state  # noqa: E402

STEPS, BATCH, IN_LEN, TGT_LEN, LR = 4, 8, 7, 3, 1e-3


def _batches():
  rng = np.random.RandomState(0)
  out = []
  for _ in range(STEPS):
    enc = rng.randint(2, 64, (BATCH, IN_LEN)).astype(np.int32)
    tgt = rng.randint(2, 64, (BATCH, TGT_LEN)).astype(np.int32)
    tgt[:, -1] = 1
    dec = np.concatenate([np.zeros((BATCH, 1), np.int32), tgt[:, :-1]], axis=1)
    out.append(dict(encoder_input_tokens=enc, decoder_input_tokens=dec,
                    decoder_target_tokens=tgt, decoder_loss_weights=np.ones_like(tgt),
                    task_ids=rng.randint(0, 3, (BATCH,)).astype(np.int32)))
  return out


def test_first_steps_losses_and_params_agree():
  config = network.T5Config.from_size('tiny', method='global', num_tasks=3,
                                      dtype=jnp.float32, dropout_rate=0.0)
  params = jax.tree_util.tree_map(np.asarray, network.random_params(config, seed=3))
  batches = _batches()

  # The lean trainer: its train step and default optimizer.
  ours = models.EncoderDecoderModel(config)
  optimizer = optim.make_optimizer('adafactor', LR, params=params,
                                   param_axes=ours.logical_axes(IN_LEN, TGT_LEN))
  mesh = partitioning.make_mesh(1, jax.devices()[:1])
  state, shardings = train_state.create_train_state(
      ours, optimizer, jax.random.PRNGKey(0), mesh, partitioning.standard_logical_axis_rules(),
      IN_LEN, TGT_LEN, initial_params=params)
  step = train_state.make_train_step(ours, optimizer, mesh, shardings, donate=False)
  our_losses = []
  for batch in batches:
    state, metrics = step(state, batch)
    our_losses.append(float(metrics['loss']))

  # T5X: its model class, Adafactor and train step; loss per target token like ours.
  vocab = seqio.PassThroughVocabulary(config.vocab_size, eos_id=1)  # ids = the model's rows
  theirs = t5x_model.HyperPromptEncoderDecoderModel(
      network.Transformer(config), vocab, vocab,
      adafactor.Adafactor(decay_rate=0.8, step_offset=0,
                          logical_factor_rules=t5x_model.logical_factor_rules()),
      z_loss=1e-4, loss_normalizing_factor='NUM_REAL_TARGET_TOKENS')
  axes = jax.eval_shape(lambda: theirs.get_initial_variables(
      jax.random.PRNGKey(0), {'encoder_input_tokens': (BATCH, IN_LEN),
                              'decoder_input_tokens': (BATCH, TGT_LEN)}))['params_axes']
  t5x_state = t5x_train_state.FlaxOptimTrainState.create(
      theirs.optimizer_def, flax.core.freeze({'params': params, 'params_axes': axes}))
  train_step = jax.jit(lambda s, b, r: t5x_trainer.train_with_lr(
      s, b, jnp.float32(LR), r, theirs, None))
  their_losses = []
  for batch in batches:
    t5x_state, metrics = train_step(t5x_state, batch, jax.random.PRNGKey(1))
    their_losses.append(float(metrics['loss'].compute()))

  np.testing.assert_allclose(their_losses, our_losses, rtol=2e-5)
  moved = max(float(np.max(np.abs(np.asarray(a) - b))) for a, b in zip(
      jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(params)))
  assert moved > 1e-4  # they take steps, not just agree
  for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(state.params)[0],
                               jax.tree_util.tree_leaves(t5x_state.params)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))
