"""Task conditioning: effect of task ids, causal visibility, masking, isolation, gradients."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hyperprompt_t5x.model import conditioning
from hyperprompt_t5x.model import layers
from hyperprompt_t5x.model import network
from hyperprompt_t5x.model import param_count

CONDITIONED = ('share', 'sep', 'global', 'prompt_tuning', 'hyperformer')
TINY = dict(vocab_size=64, emb_dim=16, num_heads=2, head_dim=6, mlp_dim=24,
            num_encoder_layers=1, num_decoder_layers=1, num_tasks=3, dtype=jnp.float32,
            dropout_rate=0.0, prompt_length=3, bottleneck=4, task_embed_dim=4,
            layer_task_dim=5, adapter_dim=4)
# Per method, flags that make every conditioning parameter exist and be used.
FULL_FLAGS = {
    'share': dict(prompt_cross_attention=True, hyper_bias=True),
    'sep': dict(hyper_bias=True),
    'global': dict(prompt_cross_attention=True, hyper_bias=True),
    'prompt_tuning': {},
    'hyperformer': {},
}


def _config(method, **kw):
  return network.T5Config(**{**TINY, 'method': method, **FULL_FLAGS[method], **kw})


def _loss_grads_logits(cfg, params, enc, dec_in, tgt, ids):
  """(loss, logits), grads of the masked mean cross-entropy."""
  def loss_fn(p):
    logits = network.Transformer(cfg).apply({'params': p}, enc, dec_in, tgt, ids,
                                            enable_dropout=False)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tgt)
    return jnp.sum(ce * (tgt > 0)) / jnp.sum(tgt > 0), logits
  return jax.value_and_grad(loss_fn, has_aux=True)(params)


def _shift_right(tgt):
  return jnp.concatenate([jnp.zeros_like(tgt[:, :1]), tgt[:, :-1]], axis=1)


# Every config in one jit: each XLA compile costs seconds of CPU here.
CONFIGS = {m: _config(m) for m in CONDITIONED}
# Only decoder self-attention prompted: position 0 can move only through it.
CONFIGS['decoder_self_only'] = _config('global', prompt_encoder=False, prompt_decoder=True,
                                       prompt_cross_attention=False)


PADDING_METHODS = ('global', 'prompt_tuning', 'hyperformer')
PAD_ENC = jnp.array([[5, 9, 12], [8, 4, 11]], jnp.int32)
PAD_TGT = jnp.array([[6, 1], [13, 2]], jnp.int32)
PAD_IDS = jnp.array([0, 2], jnp.int32)


@jax.jit
def _run_all(params, enc, tgt, ids):
  out = {name: _loss_grads_logits(cfg, params[name], enc, _shift_right(tgt), tgt, ids)
         for name, cfg in CONFIGS.items() if name in CONDITIONED}
  # Logits only (no grads needed) for the decoder-self-attention-only model.
  logits = network.Transformer(CONFIGS['decoder_self_only']).apply(
      {'params': params['decoder_self_only']}, enc, _shift_right(tgt), tgt, ids,
      enable_dropout=False)
  out['decoder_self_only'] = ((None, logits), None)
  # Padding check (fixed inputs): logits without and with trailing padding.
  padded_enc, padded_tgt = jnp.pad(PAD_ENC, ((0, 0), (0, 3))), jnp.pad(PAD_TGT, ((0, 0), (0, 2)))
  for m in PADDING_METHODS:
    model = network.Transformer(CONFIGS[m])
    out[f'padding/{m}'] = tuple(
        model.apply({'params': params[m]}, e, _shift_right(t), t, PAD_IDS, enable_dropout=False)
        for e, t in ((PAD_ENC, PAD_TGT), (padded_enc, padded_tgt)))
  return out


@functools.lru_cache(maxsize=1)
def _params():
  return {name: network.random_params(cfg, seed=11) for name, cfg in CONFIGS.items()}


ENC = jnp.array([[5, 9, 12, 7, 3, 0], [8, 4, 11, 0, 0, 0], [22, 31, 40, 2, 17, 0]], jnp.int32)
TGT = jnp.array([[6, 2, 9, 1], [13, 1, 0, 0], [7, 7, 5, 1]], jnp.int32)
OTHER_ENC = ENC.at[1:].set(jnp.array([[3, 3, 3, 3, 3, 3], [9, 0, 0, 0, 0, 0]]))
OTHER_TGT = TGT.at[1:].set(jnp.array([[4, 4, 4, 4], [1, 0, 0, 0]]))
BATCHES = {
    'mixed': (ENC, TGT, [0, 1, 2]),
    'alone0': (ENC, TGT, [0, 0, 0]),
    'alone1': (ENC, TGT, [1, 1, 1]),
    'alone2': (ENC, TGT, [2, 2, 2]),
    'other_rows_changed': (OTHER_ENC, OTHER_TGT, [0, 2, 1]),
    'tasks_swapped': (ENC, TGT, [1, 2, 0]),
    'same_example': (jnp.repeat(ENC[:1], 3, 0), jnp.repeat(TGT[:1], 3, 0), [0, 1, 2]),
}


@functools.lru_cache(maxsize=None)
def _results(batch_name):
  enc, tgt, ids = BATCHES[batch_name]
  return _run_all(_params(), enc, tgt, jnp.asarray(ids))


def _run(batch_name, config_name):
  """(logits as numpy, grads) of one config on one of BATCHES."""
  (_, logits), grads = _results(batch_name)[config_name]
  return np.asarray(logits), grads


@pytest.mark.parametrize('method', CONDITIONED)
def test_grads_reach_every_conditioning_param(method):
  """Every conditioning leaf gets a non-zero gradient (all tasks are in the batch),
  and so does every slice along a task / block / layer axis (so every prompted
  block, cross-attention included, uses its prompts)."""
  _, grads = _run('mixed', method)
  cond_grads = grads[network.CONDITIONING_KEY]
  assert len(jax.tree_util.tree_leaves(cond_grads)) == len(
      jax.tree_util.tree_leaves(_params()[method][network.CONDITIONING_KEY]))
  axes = network.param_logical_axes(CONFIGS[method])[network.CONDITIONING_KEY]
  specs = jax.tree_util.tree_leaves(
      axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  per_slice = ('tasks', 'hyper_blocks', 'hyper_layers', 'hyper_positions')
  for (path, g), spec in zip(jax.tree_util.tree_leaves_with_path(cond_grads), specs):
    g = np.abs(np.asarray(g))
    assert g.max() > 0, f'{method}: no gradient reaches {path}'
    for axis, name in enumerate(spec):
      if name in per_slice:
        other = tuple(a for a in range(g.ndim) if a != axis)
        assert (g.max(axis=other) > 0).all(), f'{method}: a {name} slice of {path} gets none'


@pytest.mark.parametrize('method', CONDITIONED)
def test_rows_of_other_tasks_do_not_leak(method):
  mixed, _ = _run('mixed', method)
  # Each row equals the same row in a batch where every row has that task ...
  for task in range(3):
    alone, _ = _run(f'alone{task}', method)
    np.testing.assert_allclose(mixed[task], alone[task], rtol=1e-6, atol=1e-6)
  # ... and does not change when the other rows' examples and tasks change.
  changed, _ = _run('other_rows_changed', method)
  np.testing.assert_allclose(changed[0], mixed[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('method', CONDITIONED)
def test_changing_only_task_ids_changes_the_output(method):
  mixed, _ = _run('mixed', method)
  swapped, _ = _run('tasks_swapped', method)
  for row in range(3):
    assert np.abs(swapped[row, 0] - mixed[row, 0]).max() > 1e-4, (method, row)
  same, _ = _run('same_example', method)
  assert np.abs(same[0] - same[1]).max() > 1e-4 and np.abs(same[1] - same[2]).max() > 1e-4


def test_first_decoder_position_sees_decoder_self_attention_prompts():
  """Encoder and cross-attention unprompted: position 0 still moves with the task."""
  logits, _ = _run('same_example', 'decoder_self_only')
  assert np.abs(logits[0, 0] - logits[1, 0]).max() > 1e-4
  assert np.abs(logits[1, 0] - logits[2, 0]).max() > 1e-4


def test_padding_gets_no_attention():
  """Trailing padding (encoder and decoder) changes no logit of a real position."""
  for method in PADDING_METHODS:
    short, padded = _results('mixed')[f'padding/{method}']
    np.testing.assert_allclose(np.asarray(padded)[:, :2], short, rtol=1e-5, atol=1e-5,
                               err_msg=method)


def test_attention_ignores_masked_keys_but_always_sees_prompts():
  """Layer level: masked key positions never matter; prompt columns always do."""
  attn = layers.MultiHeadDotProductAttention(num_heads=2, head_dim=4, float32_logits=True)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 5, 8)), jnp.float32)
  pk = jnp.asarray(rng.standard_normal((2, 3, 2, 4)), jnp.float32)
  pv = jnp.asarray(rng.standard_normal((2, 3, 2, 4)), jnp.float32)
  valid = jnp.array([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
  # Causal + padding mask, and a query row (row 0) that sees a single key.
  mask = layers.combine_masks(layers.make_attention_mask(valid, valid),
                              layers.make_causal_mask(valid))
  variables = attn.init(jax.random.PRNGKey(0), x, x, mask, deterministic=True)

  @jax.jit
  def run(kv, pk, pv):
    return attn.apply(variables, x, kv, mask, prompt_key=pk, prompt_value=pv,
                      deterministic=True)

  base = run(x, pk, pv)
  noise = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
  changed = run(jnp.where(valid[..., None] > 0, x, noise), pk, pv)
  real = np.asarray(valid, bool)
  np.testing.assert_allclose(np.asarray(changed)[real], np.asarray(base)[real], atol=1e-6)
  # Prompts reach every real query row, the first one included.
  moved = np.abs(np.asarray(run(x, pk * 2.0, pv + 1.0)) - np.asarray(base)).max(-1)
  assert (moved[real] > 1e-4).all()


NORM_SIZES = dict(vocab_size=64, emb_dim=64, num_heads=4, head_dim=16, mlp_dim=32,
                  num_encoder_layers=2, num_decoder_layers=2, num_tasks=3, dtype=jnp.float32,
                  prompt_length=8, bottleneck=16, task_embed_dim=16, layer_task_dim=16)


def _head_norm(t):
  """Mean L2 norm of the per-head vectors [..., head_dim]."""
  return float(jnp.mean(jnp.linalg.norm(t, axis=-1)))


def _real_keys_values(rng):
  """Keys/values of a freshly initialised first layer (embed -> RMS norm -> k, v)."""
  tokens = jax.random.randint(jax.random.PRNGKey(22), (4, 32), 2, 64)
  embed = layers.Embed(num_embeddings=64, features=64)
  x = embed.apply(embed.init(rng, tokens), tokens)
  x = layers.LayerNorm().apply({'params': {'scale': jnp.ones((64,))}}, x)
  attn = layers.MultiHeadDotProductAttention(num_heads=4, head_dim=16)
  params = attn.init(rng, x, x, deterministic=True)['params']
  return [jnp.einsum('bld,dhk->blhk', x, params[n]['kernel'].reshape(64, 4, 16))
          for n in ('key', 'value')]


NORM_CASES = [
    ('share', dict(hyper_bias=True, prompt_cross_attention=True)),
    ('sep', {}),
    ('global', dict(hyper_bias=True)),
]


def test_prompt_norms_at_init_are_comparable_to_real_keys_and_values():
  """Real init: mean per-head norm of prompt k/v over that of real k/v in [0.5, 2].

  Also: the materialised conditioning params number exactly the closed form.
  """
  configs = [network.T5Config(method=m, **NORM_SIZES, **flags) for m, flags in NORM_CASES]
  task_ids = jnp.arange(3)

  @jax.jit
  def init_and_generate(rng):
    out = []
    for cfg in configs:
      cond = conditioning.TaskConditioning(cfg)
      variables = cond.init(rng, task_ids)
      out.append((variables['params'], cond.apply(variables, task_ids)))
    return out, _real_keys_values(rng)

  generated, real_kv = init_and_generate(jax.random.PRNGKey(21))
  real_norms = [_head_norm(t) for t in real_kv]
  for cfg, (cond_params, prompts) in zip(configs, generated):
    leaves = jax.tree_util.tree_leaves(cond_params)
    assert all(np.isfinite(np.asarray(x)).all() for x in leaves)
    assert sum(x.size for x in leaves) == param_count.closed_form_added(cfg), cfg.method
    for i, real in enumerate(real_norms):
      for kind in ('encoder', 'decoder'):
        ratio = _head_norm(prompts[kind][i]) / real
        assert 0.5 <= ratio <= 2.0, (cfg.method, ('key', 'value')[i], kind, ratio)
