"""T5 1.1 backbone: T5X parameter tree, config validation, impl/remat/dtype equivalences."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hyperprompt_t5x.model import network

# emb 16 != heads*head_dim = 2*6: catches any mix-up of embed and joined_kv.
TINY = dict(vocab_size=64, emb_dim=16, num_heads=2, head_dim=6, mlp_dim=24,
            num_encoder_layers=2, num_decoder_layers=2)


def _flat(tree):
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    out['/'.join(str(getattr(k, 'key', k)) for k in path)] = leaf
  return out


def _expected_t5x_tree(v, d, h, k, f, n_enc, n_dec):
  """The parameter tree of docs/METHODS.md: name -> (shape, logical axes)."""
  att = lambda prefix: {
      f'{prefix}/query/kernel': ((d, h * k), ('embed', 'joined_kv')),
      f'{prefix}/key/kernel': ((d, h * k), ('embed', 'joined_kv')),
      f'{prefix}/value/kernel': ((d, h * k), ('embed', 'joined_kv')),
      f'{prefix}/out/kernel': ((h * k, d), ('joined_kv', 'embed'))}
  mlp = lambda prefix: {
      f'{prefix}/wi_0/kernel': ((d, f), ('embed', 'mlp')),
      f'{prefix}/wi_1/kernel': ((d, f), ('embed', 'mlp')),
      f'{prefix}/wo/kernel': ((f, d), ('mlp', 'embed'))}
  norm = lambda name: {f'{name}/scale': ((d,), ('embed',))}
  tree = {'token_embedder/embedding': ((v, d), ('vocab', 'embed')),
          'encoder/relpos_bias/rel_embedding': ((h, 32), ('heads', 'relpos_buckets')),
          'decoder/relpos_bias/rel_embedding': ((h, 32), ('heads', 'relpos_buckets')),
          'decoder/logits_dense/kernel': ((d, v), ('embed', 'vocab'))}
  tree.update(norm('encoder/encoder_norm'))
  tree.update(norm('decoder/decoder_norm'))
  for i in range(n_enc):
    p = f'encoder/layers_{i}'
    tree.update(norm(f'{p}/pre_attention_layer_norm'))
    tree.update(att(f'{p}/attention'))
    tree.update(norm(f'{p}/pre_mlp_layer_norm'))
    tree.update(mlp(f'{p}/mlp'))
  for i in range(n_dec):
    p = f'decoder/layers_{i}'
    for n in ('pre_self_attention_layer_norm', 'pre_cross_attention_layer_norm',
              'pre_mlp_layer_norm'):
      tree.update(norm(f'{p}/{n}'))
    tree.update(att(f'{p}/self_attention'))
    tree.update(att(f'{p}/encoder_decoder_attention'))
    tree.update(mlp(f'{p}/mlp'))
  return tree


def test_param_tree_is_exactly_t5x():
  cfg = network.T5Config(method='none', **TINY)
  shapes = _flat(network.param_shapes(cfg))
  axes = _flat(network.param_logical_axes(cfg))
  expected = _expected_t5x_tree(64, 16, 2, 6, 24, 2, 2)
  assert {n: tuple(s.shape) for n, s in shapes.items()} == {
      n: s for n, (s, _) in expected.items()}
  assert {n: tuple(a) for n, a in axes.items()} == {n: a for n, (_, a) in expected.items()}
  assert all(s.dtype == jnp.float32 for s in shapes.values())


@pytest.mark.parametrize('method', network.METHODS)
def test_conditioning_params_only_under_task_conditioning(method):
  cfg = network.T5Config(method=method, num_tasks=3, **TINY)
  shapes = _flat(network.param_shapes(cfg))
  backbone = {n for n in shapes if not n.startswith(network.CONDITIONING_KEY + '/')}
  assert backbone == set(_expected_t5x_tree(64, 16, 2, 6, 24, 2, 2))
  axes = _flat(network.param_logical_axes(cfg))
  assert set(axes) == set(shapes)
  for name, spec in axes.items():
    assert len(spec) == len(shapes[name].shape), name
  if method in ('share', 'sep', 'global', 'prompt_tuning'):
    assert shapes['task_conditioning/prompts'].shape == (3, cfg.prompt_length, 16)
    assert tuple(axes['task_conditioning/prompts']) == ('tasks', 'prompt_len', 'embed')


def test_tied_logits_have_no_logits_dense():
  cfg = network.T5Config(logits_via_embedding=True, **TINY)
  assert 'decoder/logits_dense/kernel' not in _flat(network.param_shapes(cfg))


@pytest.mark.parametrize('kwargs,match', [
    (dict(method='hyperprompt'), r"method='hyperprompt' is unknown.*'none', 'share', 'sep'"),
    (dict(emb_dim=0), r'emb_dim=0 must be a positive integer'),
    (dict(method='global', bottleneck=-1), r'bottleneck=-1'),
    (dict(method='share', prompt_encoder=False, prompt_decoder=False), r'prompts no attention'),
    (dict(attention_impl='flash'), r"attention_impl='flash'"),
    (dict(remat_policy='some'), r"remat_policy='some'"),
    (dict(dropout_rate=1.5), r'dropout_rate'),
])
def test_bad_config_is_one_clear_error(kwargs, match):
  with pytest.raises(ValueError, match=match):
    network.T5Config(**kwargs)


def test_from_size_shapes_and_unknown_size():
  base = network.T5Config.from_size('base', method='global')
  assert (base.emb_dim, base.num_heads, base.num_encoder_layers, base.head_dim,
          base.mlp_dim) == (768, 12, 12, 64, 2048)
  small = network.T5Config.from_size('small')
  assert (small.emb_dim, small.num_heads, small.num_decoder_layers, small.mlp_dim) == (
      512, 6, 8, 1024)
  with pytest.raises(ValueError, match="unknown T5 size 'huge'"):
    network.T5Config.from_size('huge')


def _batch():
  enc = jnp.array([[5, 9, 12, 7, 3, 0], [8, 4, 11, 0, 0, 0]], jnp.int32)
  tgt = jnp.array([[6, 2, 9, 1], [13, 1, 0, 0]], jnp.int32)
  dec_in = jnp.concatenate([jnp.zeros_like(tgt[:, :1]), tgt[:, :-1]], axis=1)
  return enc, dec_in, tgt, jnp.array([2, 0], jnp.int32)


def test_task_ids_out_of_range_is_one_clear_error():
  cfg = network.T5Config(method='global', num_tasks=3, dtype=jnp.float32, **TINY)
  params = network.random_params(cfg)
  model = network.Transformer(cfg)
  enc, dec_in, tgt, _ = _batch()
  with pytest.raises(ValueError, match=r'num_tasks=3\): bad ids \[-1, 7\]'):
    model.apply({'params': params}, enc, dec_in, tgt, jnp.array([7, -1]))
  with pytest.raises(ValueError, match='task_ids is required'):
    model.apply({'params': params}, enc, dec_in, tgt, None)
  with pytest.raises(ValueError, match=r'task_ids shape \(3,\)'):
    model.apply({'params': params}, enc, dec_in, tgt, jnp.array([0, 1, 2]))
  assert network.check_task_ids([0, 2, 1], 3).dtype == np.int32
  with pytest.raises(ValueError, match=r'bad ids \[3\]'):
    network.check_task_ids(np.array([0, 3]), 3)


def _loss_fn(cfg):
  model = network.Transformer(cfg)

  def loss(params, batch, rng):
    enc, dec_in, tgt, ids = batch
    logits = model.apply({'params': params}, enc, dec_in, tgt, ids, enable_dropout=True,
                         rngs={'dropout': rng})
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tgt)
    return jnp.sum(ce * (tgt > 0)) / jnp.sum(tgt > 0)
  return loss


# Global prompts on every attention (incl. cross-attention), float32, 1+1 layers.
PROMPTED = dict(TINY, method='global', num_tasks=3, dtype=jnp.float32, prompt_length=3,
                bottleneck=4, task_embed_dim=4, layer_task_dim=5, prompt_cross_attention=True,
                num_encoder_layers=1, num_decoder_layers=1)
# Variants whose logits must match PROMPTED's; one jit for all (XLA compiles cost seconds).
VARIANTS = {
    'reference': network.T5Config(**PROMPTED),
    # 'dot_product_attention' (+ one-hot embedding lookup) == 'xla' (+ gather).
    'dot_product_attention': network.T5Config(**dict(
        PROMPTED, attention_impl='dot_product_attention', embedding_lookup='one_hot')),
    'bfloat16': network.T5Config(**dict(PROMPTED, dtype=jnp.bfloat16)),
}


@functools.lru_cache(maxsize=1)
def _variant_logits():
  params = network.random_params(VARIANTS['reference'], seed=3)

  @jax.jit
  def run(params, batch):
    return {name: network.Transformer(cfg).apply({'params': params}, *batch,
                                                 enable_dropout=False)
            for name, cfg in VARIANTS.items()}
  return {k: np.asarray(v) for k, v in run(params, _batch()).items()}


def test_attention_impls_and_lookups_agree_with_prompts_and_padding():
  logits = _variant_logits()
  np.testing.assert_allclose(logits['dot_product_attention'], logits['reference'],
                             rtol=1e-5, atol=1e-5)


def test_bf16_runs_and_is_close_to_float32():
  logits = _variant_logits()
  l32, l16 = logits['reference'], logits['bfloat16']
  assert l16.dtype == np.float32 and l16.shape == l32.shape == (2, 4, 64)
  assert np.isfinite(l16).all()
  err = np.abs(l16 - l32).max()
  assert err < 0.05 * np.abs(l32).max(), err
  # The prediction hardly changes.
  assert (np.argmax(l16, -1) == np.argmax(l32, -1)).mean() >= 0.75


def test_remat_policies_give_same_loss_and_grads():
  # Dropout off: each dropout site costs a threefry compile (seconds on CPU).
  base = dict(PROMPTED, dropout_rate=0.0)
  params = network.random_params(network.T5Config(**base), seed=4)

  @jax.jit
  def run(params, batch, rng):
    return {policy: jax.value_and_grad(_loss_fn(network.T5Config(**base, remat_policy=policy)))(
        params, batch, rng) for policy in network.REMAT_POLICIES}
  results = run(params, _batch(), jax.random.PRNGKey(7))
  ref_loss, ref_grads = results['none']
  for policy, (loss, grads) in results.items():
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6, err_msg=policy)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=policy),
        grads, ref_grads)
