"""The train step's leaner paths compute the same function as the plain ones.

* fused attention keeps bf16 operands (float32 accumulation), same output as 'xla';
* prompts gathered per layer == every block's prompts gathered per example up
  front (the former layout), for logits and gradients;
* attention_dropout_rate=None is dropout_rate (T5X); with it 0 the fused
  attention trains with dropout elsewhere and equals the 'xla' path.
(The decode cache with prompt columns: tests/model/test_decoding.py.)
"""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hyperprompt_t5x.model import conditioning
from hyperprompt_t5x.model import layers
from hyperprompt_t5x.model import network

# Global prompts on every attention block, 1+1 layers, emb 16 != heads*head_dim.
PROMPTED = dict(vocab_size=64, emb_dim=16, num_heads=2, head_dim=6, mlp_dim=24,
                num_encoder_layers=1, num_decoder_layers=1, method='global', num_tasks=3,
                dtype=jnp.float32, prompt_length=3, bottleneck=4, task_embed_dim=4,
                layer_task_dim=5, prompt_cross_attention=True)


def _batch():
  enc = jnp.array([[5, 9, 12, 7, 3, 0], [8, 4, 0, 0, 0, 0]], jnp.int32)
  tgt = jnp.array([[3, 7, 2, 0], [9, 9, 4, 6]], jnp.int32)
  dec_in = jnp.concatenate([jnp.zeros((2, 1), jnp.int32), tgt[:, :-1]], axis=1)
  return enc, dec_in, tgt, jnp.array([2, 0], jnp.int32)


def _dot_operand_types(fn, *args):
  """The operand types of every dot_general in fn's lowered StableHLO."""
  text = jax.jit(fn).lower(*args).as_text()
  return re.findall(r'stablehlo\.dot_general.*?: \((tensor<[^>]*>), (tensor<[^>]*>)\)', text)


def test_fused_attention_keeps_bf16_operands_and_equals_xla():
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((2, 5, 2, 8)), jnp.bfloat16) for _ in range(3))
  bias = jnp.asarray(rng.standard_normal((1, 2, 5, 5)), jnp.float32)
  outs = {}
  for impl in ('xla', 'dot_product_attention'):
    fn = functools.partial(layers.dot_product_attention, dtype=jnp.bfloat16,
                           float32_logits=True, impl=impl, deterministic=True)
    dots = _dot_operand_types(fn, q, k, v, bias)
    assert len(dots) == 2, (impl, dots)
    assert all('bf16' in a and 'bf16' in b for a, b in dots), (impl, dots)
    outs[impl] = np.asarray(fn(q, k, v, bias), np.float32)
  # Same bf16 operands, float32 logits and softmax: equal up to bf16 output rounding.
  np.testing.assert_allclose(outs['dot_product_attention'], outs['xla'], rtol=2e-2, atol=2e-2)


def _old_layout_forward(cfg):
  """Logits with every block's prompts gathered per example before the encoder runs.

  The up-front layout ([blocks, batch, l, heads, kv]) as a reference; here each example
  becomes its own 'task' (task ids 0..batch-1) so the per-layer gather is the identity.
  """
  def forward(module, enc, dec_in, tgt, ids):
    cond = module.compute_conditioning(ids, enc.shape[0])
    cond = {kind: tuple(conditioning.gather_tasks(x, ids, axis=1) for x in pair)
            for kind, pair in cond.items()}
    own = jnp.arange(enc.shape[0])
    encoded = module.encode(enc, own, enable_dropout=False, conditioning=cond)
    return module.decode(encoded, enc, dec_in, tgt, own, enable_dropout=False,
                         conditioning=cond)
  return forward


def _loss(cfg, per_layer: bool, dropout_rng=None):
  model = network.Transformer(cfg)

  def loss(params, batch, weights):
    if per_layer:
      logits = model.apply({'params': params}, *batch, enable_dropout=dropout_rng is not None,
                           rngs={} if dropout_rng is None else {'dropout': dropout_rng})
    else:
      logits = model.apply({'params': params}, *batch, method=_old_layout_forward(cfg))
    return jnp.sum(logits * weights), logits
  return loss


@functools.lru_cache(maxsize=1)
def _results():
  cfg = network.T5Config(**PROMPTED)
  params = network.random_params(cfg, seed=5)
  weights = jnp.asarray(np.random.default_rng(1).standard_normal((2, 4, 64)), jnp.float32)
  dropout = dict(PROMPTED, dropout_rate=0.1)
  dropout_cfgs = {
      'default': network.T5Config(**dropout),
      'explicit': network.T5Config(**dropout, attention_dropout_rate=0.1),
      'xla_no_attn': network.T5Config(**dropout, attention_dropout_rate=0.0),
      'fused_no_attn': network.T5Config(**dropout, attention_dropout_rate=0.0,
                                        attention_impl='dot_product_attention'),
  }

  @jax.jit
  def run(params, batch, weights, rng):
    grad = lambda c, per_layer, r=None: jax.value_and_grad(
        _loss(c, per_layer, r), has_aux=True)(params, batch, weights)
    out = {'per_layer': grad(cfg, True), 'up_front': grad(cfg, False)}
    out.update({name: grad(c, True, rng)[0][0] for name, c in dropout_cfgs.items()})
    return out
  return jax.tree_util.tree_map(np.asarray, run(params, _batch(), weights,
                                                jax.random.PRNGKey(3)))


def test_prompts_gathered_per_layer_equal_gathered_up_front():
  res = _results()
  (loss_new, logits_new), grads_new = res['per_layer']
  (loss_old, logits_old), grads_old = res['up_front']
  np.testing.assert_allclose(logits_new, logits_old, rtol=1e-6, atol=1e-6)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                         grads_new, grads_old)
  # The prompts matter here (a model ignoring them would pass the above trivially).
  tc = grads_new[network.CONDITIONING_KEY]
  assert all(np.abs(x).max() > 0 for x in jax.tree_util.tree_leaves(tc))


def test_attention_dropout_rate():
  res = _results()
  # None means dropout_rate: T5X's behaviour, bit for bit.
  assert res['default'] == res['explicit']
  # Attention dropout off, other dropout on: fused attention == the einsum path,
  # and different from dropping attention weights too.
  np.testing.assert_allclose(res['fused_no_attn'], res['xla_no_attn'], rtol=1e-5)
  assert res['xla_no_attn'] != res['default']


def test_attention_dropout_rate_is_validated():
  import pytest  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match='attention_dropout_rate=1.5'):
    network.T5Config(attention_dropout_rate=1.5)
  assert network.T5Config(dropout_rate=0.2).attention_dropout == 0.2
  assert network.T5Config(dropout_rate=0.2, attention_dropout_rate=0.0).attention_dropout == 0.0
