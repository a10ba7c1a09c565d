"""HyperFormer++ (Karimi Mahabadi et al., ACL 2021): hypernetwork-generated adapters.

As the original (authors' `AdapterLayersOneHyperNetController`,
`add_layer_norm_before_adapter=False`, `add_layer_norm_after_adapter=True`,
`unique_hyper_net_layer_norm=True`):

* one adapter after the self-attention and one after the MLP of every encoder
  and decoder layer, on the sublayer output y before the residual:
      y + LN_τ(U(act(D y + d_b)) + u_b)
  where LN_τ is a layer norm (mean and variance) whose gain and bias are
  generated per task (the original's conditional post-adapter layer norm);
  act is tanh-gelu (the original's `gelu_new`).
* task embeddings k_τ [T, t'] shared by the two stacks; ONE hypernetwork PER
  STACK (encoder, decoder), each with its own layer-id embeddings [L_s, t'],
  adapter-position embeddings [2, t'], projector h: 3t' -> t -> t (ReLU), a
  layer norm of the projected embedding (`embedding_norm`), and linear
  generators (with biases) of D [d, a] + d_b [a], U [a, d] + u_b [d] and the
  layer-norm gain and bias [d], [d].

Parameter tree under `task_conditioning` (the same key as every method):
`task_embedding`, `encoder/...`, `decoder/...`; closed form in param_count.py.

Initialisation: embeddings N(0, 1); D and U generated with variance 1/d and
1/a (fan-in, so the adapter's hidden layer has unit scale); the layer-norm
gain and bias generated with std ~1e-2, so every adapter starts close to the
identity, as in the original (whose generators all start at std 1e-2).

Cost: generation runs once per forward pass for all (layer, position, task)
triples (a few MFLOPs). Applying the adapter per example needs each example's
[d, a] weights; when the sequence is short relative to the width
(T·len <= 2d, e.g. the decoder, cached decoding, or a single task) it is
cheaper to run every task's adapter on the whole batch and keep each
example's own output (a one-hot mask), with no per-example weights at all.
`apply_adapter` picks the cheaper path from the static shapes; both give the
same output.
"""
from typing import Any, Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hyperprompt_t5x.model import conditioning as cond_lib
from hyperprompt_t5x.model import layers

Array = jax.Array
ADAPTER_POSITIONS = ('self_attention', 'mlp')  # adapter positions per layer
STACKS = ('encoder', 'decoder')
EPSILON = 1e-6


def standardize(x: Array) -> Array:
  """(x - mean) / std over the last axis, statistics in float32 (a layer norm without gain)."""
  x32 = jnp.asarray(x, jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  return (x32 - mean) * jax.lax.rsqrt(var + EPSILON)


class EmbeddingNorm(nn.Module):
  """Layer norm (mean, variance, gain, bias) of the projected embedding [..., t]."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    features = x.shape[-1]
    scale = layers.param_with_axes('scale', nn.initializers.ones, (features,), jnp.float32,
                                   axes=('layer_task',))
    bias = layers.param_with_axes('bias', nn.initializers.zeros, (features,), jnp.float32,
                                  axes=('layer_task',))
    return standardize(x) * scale + bias


class StackHypernet(nn.Module):
  """One stack's hypernetwork: task embeddings [T, t'] -> adapter weights [L_s, 2, T, ...]."""
  config: Any
  num_layers: int

  @nn.compact
  def __call__(self, task_emb: Array) -> Dict[str, Array]:
    cfg = self.config
    num_t, te, t = cfg.num_tasks, cfg.task_embed_dim, cfg.layer_task_dim
    d, a = cfg.emb_dim, cfg.adapter_dim
    num_l, num_p = self.num_layers, len(ADAPTER_POSITIONS)
    layer_emb = layers.param_with_axes('layer_embedding', cond_lib.normal_init(1.0),
                                       (num_l, te), jnp.float32,
                                       axes=('hyper_layers', 'task_embed'))
    pos_emb = layers.param_with_axes('position_embedding', cond_lib.normal_init(1.0),
                                     (num_p, te), jnp.float32,
                                     axes=('hyper_positions', 'task_embed'))
    shape = (num_l, num_p, num_t, te)
    # [L_s, P, T, 3t'] = [task; layer; position] (the original's order)
    joined = jnp.concatenate([
        jnp.broadcast_to(task_emb[None, None], shape),
        jnp.broadcast_to(layer_emb[:, None, None], shape),
        jnp.broadcast_to(pos_emb[None, :, None], shape)], axis=-1)
    # [L_s, P, T, 3t'] -> [L_s, P, T, t], then layer-normalised
    emb = EmbeddingNorm(name='embedding_norm')(cond_lib.task_projector(joined, t, True))
    axes = ('layer_task', 'hyper_generated')
    gen_down = cond_lib.Linear(d * a + a, True, axes, cond_lib.normal_init(1.0 / np.sqrt(t * d)),
                               name='adapter_down')(emb)
    gen_up = cond_lib.Linear(a * d + d, True, axes, cond_lib.normal_init(1.0 / np.sqrt(t * a)),
                             name='adapter_up')(emb)
    gen_norm = cond_lib.Linear(2 * d, True, axes, cond_lib.normal_init(1e-2 / np.sqrt(t)),
                               name='adapter_norm')(emb)
    lead = (num_l, num_p, num_t)
    return {
        'down': gen_down[..., :d * a].reshape(lead + (d, a)),
        'down_bias': gen_down[..., d * a:],
        'up': gen_up[..., :a * d].reshape(lead + (a, d)),
        'up_bias': gen_up[..., a * d:],
        'scale': gen_norm[..., :d],
        'shift': gen_norm[..., d:],
    }


class AdapterConditioning(nn.Module):
  """HyperFormer++'s conditioning (named `task_conditioning` in the tree).

  `__call__(task_ids)` returns {'adapters': {name: [L_enc + L_dec, 2, T, ...]}}
  (encoder layers first), gathered by task inside each layer (`apply_adapter`).
  """
  config: Any

  @nn.compact
  def __call__(self, task_ids: Array) -> Dict[str, Any]:
    del task_ids  # weights for all tasks; selected per example in apply_adapter
    cfg = self.config
    task_emb = layers.param_with_axes('task_embedding', cond_lib.normal_init(1.0),
                                      (cfg.num_tasks, cfg.task_embed_dim), jnp.float32,
                                      axes=('tasks', 'task_embed'))
    per_stack = [StackHypernet(cfg, n, name=stack)(task_emb) for stack, n in
                 zip(STACKS, (cfg.num_encoder_layers, cfg.num_decoder_layers))]
    # [L_enc, ...] ; [L_dec, ...] -> [L_enc + L_dec, ...]
    return {'adapters': {k: jnp.concatenate([s[k] for s in per_stack], axis=0)
                         for k in per_stack[0]}}


def per_task_is_cheaper(num_tasks: int, length: int, emb_dim: int) -> bool:
  """Every task's adapter on the batch ([batch, len, T, a] live) beats per-example
  weights ([batch, d, a] twice) when T·len <= 2d."""
  return num_tasks * length <= 2 * emb_dim


def apply_adapter(y: Array, adapter: Dict[str, Array], task_ids: Array, dtype,
                  per_task: Optional[bool] = None) -> Array:
  """y + LN_τ(U(gelu(D y))) with per-task weights [T, ...]; y [batch, len, d].

  per_task: None picks the cheaper path from the shapes (`per_task_is_cheaper`).
  Out-of-range task ids give NaN rows (as the prompt gathers do).
  """
  num_t = adapter['down'].shape[0]
  if per_task is None:
    per_task = per_task_is_cheaper(num_t, y.shape[1], y.shape[2])
  w = {k: jnp.asarray(v, dtype) for k, v in adapter.items()}
  x = jnp.asarray(y, dtype)
  if per_task:
    # [batch] -> [batch, T] (a zero row for an out-of-range id)
    select = jax.nn.one_hot(task_ids, num_t, dtype=dtype)
    # [batch, len, d] x [T, d, a] -> [batch, len, T, a]
    h = jnp.einsum('bld,tda->blta', x, w['down']) + w['down_bias']
    h = jax.nn.gelu(h, approximate=True) * select[:, None, :, None]
    # [batch, len, T, a] x [T, a, d] -> [batch, len, d]
    out = jnp.einsum('blta,tad->bld', h, w['up'])
    # [batch, T] x [T, d] -> [batch, 1, d]
    out = out + jnp.dot(select, w['up_bias'])[:, None]
  else:
    g = {k: cond_lib.gather_tasks(w[k], task_ids, axis=0)
         for k in ('down', 'down_bias', 'up', 'up_bias')}
    # [batch, len, d] x [batch, d, a] -> [batch, len, a]
    h = jnp.einsum('bld,bda->bla', x, g['down']) + g['down_bias'][:, None]
    h = jax.nn.gelu(h, approximate=True)
    # [batch, len, a] x [batch, a, d] -> [batch, len, d]
    out = jnp.einsum('bla,bad->bld', h, g['up']) + g['up_bias'][:, None]
  # Conditional post-adapter layer norm: [batch, d] gain and bias per example.
  scale = cond_lib.gather_tasks(w['scale'], task_ids, axis=0)
  shift = cond_lib.gather_tasks(w['shift'], task_ids, axis=0)
  out = jnp.asarray(standardize(out), dtype) * scale[:, None] + shift[:, None]
  return y + out
