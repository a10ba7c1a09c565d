"""HyperFormer++ against a numpy reference of the original's equations, on a tiny case.

The reference follows the authors' code (rabeehk/hyperformer,
AdapterLayersOneHyperNetController + MetaLayersAdapterController):
e = LN(h([k_τ; z_layer; z_position])) per stack, generators linear in e,
adapter y + LN(U gelu(D y + d_b) + u_b; gain, bias).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hyperprompt_t5x.model import hyperformer
from hyperprompt_t5x.model import network
from hyperprompt_t5x.model import param_count

TINY = dict(vocab_size=16, emb_dim=4, num_heads=1, head_dim=4, mlp_dim=8,
            num_encoder_layers=2, num_decoder_layers=1, num_tasks=3, dtype=jnp.float32,
            dropout_rate=0.0, task_embed_dim=3, layer_task_dim=5, adapter_dim=2,
            method='hyperformer')


def _gelu(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _layer_norm(x, gain, bias):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + 1e-6) * gain + bias


def _reference_weights(p, task, layer, position, cfg):
  """One (stack params p, task, layer, position) of the original's hypernetwork."""
  d, a = cfg.emb_dim, cfg.adapter_dim
  joined = np.concatenate([p['task_embedding'][task], p['layer_embedding'][layer],
                           p['position_embedding'][position]])
  hid = np.maximum(joined @ p['layer_task_hidden']['kernel'] + p['layer_task_hidden']['bias'], 0)
  e = hid @ p['layer_task_out']['kernel'] + p['layer_task_out']['bias']
  e = _layer_norm(e, p['embedding_norm']['scale'], p['embedding_norm']['bias'])
  gen = {k: e @ p[k]['kernel'] + p[k]['bias'] for k in ('adapter_down', 'adapter_up',
                                                        'adapter_norm')}
  return dict(down=gen['adapter_down'][:d * a].reshape(d, a), down_bias=gen['adapter_down'][d * a:],
              up=gen['adapter_up'][:a * d].reshape(a, d), up_bias=gen['adapter_up'][a * d:],
              scale=gen['adapter_norm'][:d], shift=gen['adapter_norm'][d:])


def _reference_adapter(y, w):
  out = _gelu(y @ w['down'] + w['down_bias']) @ w['up'] + w['up_bias']
  return y + _layer_norm(out, w['scale'], w['shift'])


def _np(tree):
  return jax.tree_util.tree_map(np.asarray, tree)


def test_generated_adapters_and_their_application_match_the_original():
  cfg = network.T5Config(**TINY)
  params = network.random_params(cfg, seed=3)[network.CONDITIONING_KEY]
  # One hypernetwork per stack, task embeddings shared.
  assert sorted(params) == ['decoder', 'encoder', 'task_embedding']
  assert params['encoder']['layer_embedding'].shape == (2, 3)
  assert params['decoder']['layer_embedding'].shape == (1, 3)
  assert sum(x.size for x in jax.tree_util.tree_leaves(params)) == \
      param_count.closed_form_added(cfg)

  ids = jnp.array([2, 0, 1, 2], jnp.int32)
  y = jax.random.normal(jax.random.PRNGKey(0), (4, 3, cfg.emb_dim))

  @jax.jit
  def run(params, y):
    gen = hyperformer.AdapterConditioning(cfg).apply({'params': params}, ids)['adapters']
    outs = {}
    for layer in range(3):
      for pos in range(2):
        w = {k: v[layer, pos] for k, v in gen.items()}
        outs[layer, pos] = [hyperformer.apply_adapter(y, w, ids, jnp.float32, per_task=pt)
                            for pt in (True, False)]
    return gen, outs

  gen, outs = _np(run(params, y))
  p = _np(params)
  y = np.asarray(y)
  for layer, (stack, stack_layer) in enumerate([('encoder', 0), ('encoder', 1),
                                                ('decoder', 0)]):
    sp = dict(p[stack], task_embedding=p['task_embedding'])
    for pos in range(2):
      per_task, per_example = outs[layer, pos]
      # Both application paths give the same output.
      np.testing.assert_allclose(per_task, per_example, rtol=1e-5, atol=1e-5)
      for task in range(3):
        ref = _reference_weights(sp, task, stack_layer, pos, cfg)
        for k, v in ref.items():
          np.testing.assert_allclose(gen[k][layer, pos, task], v, rtol=1e-4, atol=1e-5,
                                     err_msg=f'{stack} {stack_layer} {pos} {task} {k}')
      for row, task in enumerate(np.asarray(ids)):
        ref = _reference_adapter(y[row], _reference_weights(sp, task, stack_layer, pos, cfg))
        np.testing.assert_allclose(per_task[row], ref, rtol=1e-4, atol=1e-4)


def test_apply_adapter_paths_agree_in_bfloat16_and_out_of_range_ids_give_nan():
  rng = np.random.default_rng(0)
  num_t, d, a = 3, 8, 4
  w = {'down': rng.standard_normal((num_t, d, a)) / np.sqrt(d),
       'down_bias': rng.standard_normal((num_t, a)),
       'up': rng.standard_normal((num_t, a, d)) / np.sqrt(a),
       'up_bias': rng.standard_normal((num_t, d)),
       'scale': rng.standard_normal((num_t, d)), 'shift': rng.standard_normal((num_t, d))}
  w = {k: jnp.asarray(v, jnp.float32) for k, v in w.items()}
  y = jnp.asarray(rng.standard_normal((5, 7, d)), jnp.bfloat16)
  ids = jnp.array([0, 2, 1, 1, 0])
  a_out, b_out = (np.asarray(hyperformer.apply_adapter(y, w, ids, jnp.bfloat16, per_task=pt),
                             np.float32) for pt in (True, False))
  np.testing.assert_allclose(a_out, b_out, rtol=0.05, atol=0.05)
  for pt in (True, False):
    bad = hyperformer.apply_adapter(y, w, jnp.array([0, 3, 1, 1, 0]), jnp.bfloat16,
                                    per_task=pt)
    assert np.isnan(np.asarray(bad[1], np.float32)).all()
    assert np.isfinite(np.asarray(bad[0], np.float32)).all()


@pytest.mark.parametrize('num_tasks,length,d,expected', [
    (8, 64, 768, True),     # decoder at base: [batch, 64, 8, a] is under 2 [batch, d, a]
    (8, 512, 768, False),   # encoder at base: per-example weights are cheaper
    (1, 512, 768, True),    # one task: a plain matmul
    (8, 1, 16, True)])      # cached decoding step
def test_cheaper_path_choice(num_tasks, length, d, expected):
  assert hyperformer.per_task_is_cheaper(num_tasks, length, d) == expected
