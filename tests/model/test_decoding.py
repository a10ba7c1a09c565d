"""Cached greedy decoding equals teacher forcing, with and without hyper-prompts."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hyperprompt_t5x.model import decoding
from hyperprompt_t5x.model import network

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


# One compile for every case: each XLA compile costs seconds of CPU here.
CASES = {
    'none': _config('none'),
    'global': _config('global'),
    'share_cross': _config('share', prompt_cross_attention=True),
    'sep_decoder_only_bias': _config('sep', prompt_encoder=False, hyper_bias=True),
    'prompt_tuning': _config('prompt_tuning'),
    'hyperformer': _config('hyperformer'),
}


@jax.jit
def _decode_all(params, enc, task_ids, eos_id):
  """Per case: greedy tokens and step logits, and teacher forcing on those tokens."""
  out = {}
  for name, cfg in CASES.items():
    tokens, step_logits = decoding.greedy_decode(cfg, params[name], enc, task_ids, MAX_LEN,
                                                 eos_id=eos_id, return_logits=True)
    # Targets kept non-zero so that no decoder position is treated as padding.
    targets = jnp.where(tokens == 0, 2, tokens)
    dec_in = _shift_right(targets)
    tf_logits = decoding.teacher_forced_logits(cfg, params[name], enc, dec_in, targets,
                                               task_ids)
    out[name] = (tokens, step_logits, dec_in, tf_logits)
  return out


@functools.lru_cache(maxsize=4)
def _results(eos_id):
  enc, task_ids = _inputs()
  params = {name: network.random_params(cfg, seed=1) for name, cfg in CASES.items()}
  return jax.tree_util.tree_map(np.asarray, _decode_all(params, enc, task_ids, eos_id))


@pytest.mark.parametrize('case', list(CASES))
def test_cached_greedy_equals_teacher_forcing(case):
  # eos_id=-1 never fires: every step is compared.
  tokens, step_logits, dec_in, tf_logits = _results(-1)[case]
  assert tokens.shape == (3, MAX_LEN) and tokens.dtype == np.int32
  # Positions whose input token is exactly the decoded one (all, unless a 0 was decoded).
  same = np.asarray(_shift_right(tokens)) == dec_in
  valid = np.cumprod(same, axis=1).astype(bool)
  assert valid[:, :2].all()
  np.testing.assert_allclose(step_logits[valid], tf_logits[valid], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(tokens[valid], np.argmax(tf_logits, -1)[valid])


def test_greedy_stops_after_eos():
  free = _results(-1)['global'][0]
  eos = int(free[0, 2])  # a token row 0 emits at step 2 becomes "EOS"
  out = _results(eos)['global'][0]
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


def test_cache_holds_the_prompt_columns_once():
  """Prompted self-attention cache: [batch, l + max_len, heads, kv], prompts first, index l."""
  cfg = CASES['global']
  params = network.random_params(cfg, seed=1)
  enc, task_ids = _inputs()
  model = network.Transformer(cfg)
  cond = model.apply({'params': params}, task_ids, 3, method=model.compute_conditioning)
  encoded = model.apply({'params': params}, enc, task_ids, enable_dropout=False,
                        conditioning=cond, method=model.encode)
  cache = decoding.init_cache(cfg, params, encoded, enc, task_ids, MAX_LEN, cond)
  attn = cache['decoder']['layers_0']['self_attention']
  l, (pk, pv) = cfg.prompt_length, cond['decoder']
  assert attn['cached_key'].shape == (3, l + MAX_LEN, cfg.num_heads, cfg.head_dim)
  assert int(attn['cache_index']) == l
  np.testing.assert_array_equal(attn['cached_key'][:, :l], pk[0][task_ids])
  np.testing.assert_array_equal(attn['cached_value'][:, :l], pv[0][task_ids])
  assert not np.asarray(attn['cached_key'][:, l:]).any()
