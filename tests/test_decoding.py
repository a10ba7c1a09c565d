"""Cached greedy decoding equals teacher forcing, with and without hyper-prompts."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hyperprompt_t5x import decoding
from hyperprompt_t5x import network

MAX_LEN = 6


def _config(method, **kw):
  base = dict(method=method, num_tasks=3, dtype=jnp.float32, dropout_rate=0.0,
              num_encoder_layers=1, num_decoder_layers=1, prompt_length=3, bottleneck=4,
              task_embed_dim=4, layer_task_dim=5, adapter_dim=4)
  base.update(kw)
  return network.T5Config.from_size('tiny', **base)


def _inputs():
  enc = jnp.array([[5, 9, 12, 7, 3, 0], [8, 4, 0, 0, 0, 0], [22, 31, 40, 2, 0, 0]], jnp.int32)
  return enc, jnp.array([0, 2, 1], jnp.int32)


def _shift_right(tokens):
  return jnp.concatenate([jnp.zeros_like(tokens[:, :1]), tokens[:, :-1]], axis=1)


@pytest.mark.parametrize('method,kw', [
    ('none', {}),
    ('global', {}),
    ('share', {'prompt_cross_attention': True}),
    ('sep', {'prompt_encoder': False, 'hyper_bias': True}),
])
def test_cached_greedy_equals_teacher_forcing(method, kw):
  cfg = _config(method, **kw)
  params = network.random_params(cfg, seed=1)
  enc, task_ids = _inputs()
  # eos_id=-1 never fires: every step is compared.
  tokens, step_logits = decoding.greedy_decode(cfg, params, enc, task_ids, MAX_LEN,
                                               eos_id=-1, return_logits=True)
  assert tokens.shape == (3, MAX_LEN) and tokens.dtype == jnp.int32
  # Teacher forcing on the decoded sequence; targets kept non-zero so that no
  # decoder position is treated as padding.
  targets = jnp.where(tokens == 0, 2, tokens)
  dec_in = _shift_right(targets)
  tf_logits = decoding.teacher_forced_logits(cfg, params, enc, dec_in, targets, task_ids)
  # Positions whose input token is exactly the decoded one (all, unless a 0 was decoded).
  same = np.asarray(_shift_right(tokens) == dec_in)
  valid = np.cumprod(same, axis=1).astype(bool)
  assert valid[:, :2].all()
  np.testing.assert_allclose(np.asarray(step_logits)[valid], np.asarray(tf_logits)[valid],
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(tokens)[valid],
                                np.asarray(jnp.argmax(tf_logits, -1))[valid])


def test_greedy_stops_after_eos():
  cfg = _config('global')  # same compile as the 'global' case above
  params = network.random_params(cfg, seed=2)
  enc, task_ids = _inputs()
  free, _ = decoding.greedy_decode(cfg, params, enc, task_ids, MAX_LEN, eos_id=-1,
                                   return_logits=True)
  free = np.asarray(free)
  eos = int(free[0, 2])  # a token row 0 emits at step 2 becomes "EOS"
  out, _ = decoding.greedy_decode(cfg, params, enc, task_ids, MAX_LEN, eos_id=eos,
                                  return_logits=True)
  out = np.asarray(out)
  for row in range(out.shape[0]):
    hits = np.nonzero(free[row] == eos)[0]
    stop = hits[0] if hits.size else MAX_LEN - 1
    np.testing.assert_array_equal(out[row, :stop + 1], free[row, :stop + 1])
    assert (out[row, stop + 1:] == 0).all()


def test_greedy_rejects_bad_task_ids():
  cfg = _config('global')
  params = network.param_shapes(cfg)
  enc, _ = _inputs()
  with pytest.raises(ValueError, match=r'bad ids \[3\].*|num_tasks=3'):
    decoding.greedy_decode(cfg, params, enc, jnp.array([0, 3, 1]), MAX_LEN)
