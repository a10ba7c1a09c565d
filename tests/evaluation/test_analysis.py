"""analysis.prompt_mass against a hand (numpy) computation of the first encoder layer."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hyperprompt_t5x.evaluation import analysis
from hyperprompt_t5x.model import conditioning
from hyperprompt_t5x.model import layers
from hyperprompt_t5x.model import network

TINY = dict(vocab_size=32, emb_dim=8, num_heads=2, head_dim=4, mlp_dim=8,
            num_encoder_layers=1, num_decoder_layers=1, num_tasks=2, dtype=jnp.float32,
            dropout_rate=0.0, prompt_length=3, bottleneck=4, task_embed_dim=4,
            layer_task_dim=4, prompt_cross_attention=True)


def _hand_encoder_mass(cfg, params, enc, ids):
  """[batch, heads]: softmax over [prompts; tokens] of layer 0, mass on the prompts."""
  p = jax.tree_util.tree_map(np.asarray, params)
  prompts = conditioning.TaskConditioning(cfg).apply(
      {'params': params[network.CONDITIONING_KEY]}, ids)['encoder']
  # [layers, T, l, heads, head_dim] -> layer 0, each example's task: [batch, l, heads, head_dim]
  pk = np.asarray(prompts[0][0])[np.asarray(ids)]
  x = p['token_embedder']['embedding'][np.asarray(enc)]
  layer = p['encoder']['layers_0']
  x = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6)
  x = x * layer['pre_attention_layer_norm']['scale']
  att = layer['attention']
  shape = (cfg.emb_dim, cfg.num_heads, cfg.head_dim)
  q = np.einsum('bld,dhk->blhk', x, att['query']['kernel'].reshape(shape))
  k = np.einsum('bld,dhk->blhk', x, att['key']['kernel'].reshape(shape))
  k = np.concatenate([pk, k], axis=1)
  length, num_l = enc.shape[1], cfg.prompt_length
  pos = np.arange(length)
  buckets = layers.relative_position_bucket(pos[None, :] - pos[:, None], True, 32, 128)
  rel = p['encoder']['relpos_bias']['rel_embedding'][:, buckets]  # [heads, q, k]
  bias = np.concatenate([np.zeros((cfg.num_heads, length, num_l)), rel], axis=-1)
  logits = np.einsum('bqhd,bkhd->bhqk', q, k) + bias[None]
  key_ok = np.concatenate([np.ones((enc.shape[0], num_l), bool), np.asarray(enc) > 0], 1)
  logits = np.where(key_ok[:, None, None, :], logits, -1e10)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  mass = w[..., :num_l].sum(-1)  # [batch, heads, q]
  valid = (np.asarray(enc) > 0)[:, None, :]
  return (mass * valid).sum(-1) / valid.sum(-1)


def test_prompt_mass_matches_a_hand_computation():
  cfg = network.T5Config(method='global', **TINY)
  params = network.random_params(cfg, seed=5)
  enc = jnp.array([[5, 9, 12, 7, 0, 0], [8, 4, 11, 3, 2, 6]], jnp.int32)
  tgt = jnp.array([[6, 2, 1], [3, 1, 0]], jnp.int32)
  ids = jnp.array([1, 0], jnp.int32)
  batch = {'encoder_input_tokens': enc, 'decoder_target_tokens': tgt,
           'decoder_input_tokens': jnp.pad(tgt[:, :-1], ((0, 0), (1, 0))), 'task_ids': ids}
  out = jax.jit(lambda p, b: analysis.prompt_mass(cfg, p, b))(params, batch)
  assert sorted(out) == ['cross', 'decoder', 'encoder']
  assert out['encoder'].shape == (2, 1, 2)  # [batch, layers, heads]
  np.testing.assert_allclose(np.asarray(out['encoder'][:, 0]),
                             _hand_encoder_mass(cfg, params, enc, ids), rtol=1e-4, atol=1e-5)
  for v in out.values():
    assert np.all((np.asarray(v) > 0) & (np.asarray(v) < 1))
  entry = analysis.summarize(out, 'note')
  np.testing.assert_allclose(entry['encoder'][0], float(np.mean(out['encoder'][:, 0])),
                             rtol=1e-6)
  assert len(entry['head_std']['cross']) == 1


def test_what_applies_per_method():
  assert analysis.prompted_kinds(network.T5Config(method='prompt_tuning', **TINY)) == [
      'encoder', 'cross']
  assert analysis.prompted_kinds(network.T5Config(
      method='share', **{**TINY, 'prompt_cross_attention': False})) == ['encoder', 'decoder']
  for method in ('none', 'hyperformer'):
    with pytest.raises(ValueError, match='does not apply'):
      analysis.prompt_mass(network.T5Config(method=method, **TINY), {}, {})
