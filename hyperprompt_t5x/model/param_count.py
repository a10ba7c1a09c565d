"""Parameter accounting: counts from the abstract init, and docs/METHODS.md's closed forms.

Symbols: T = num_tasks, l = prompt_length, d = emb_dim, d_kv = heads*head_dim,
b = bottleneck, t' = task_embed_dim, t = layer_task_dim, a = adapter_dim,
M = number of prompted attention blocks = L_enc·[prompt_encoder] +
L_dec·[prompt_decoder] + L_dec·[prompt_cross_attention], L = L_enc + L_dec.

Closed forms of the added (task-conditioning) parameters:
  Share   T·l·d + M·2·(d·b + b·d_kv)            (+ M·2·(b + d_kv) with hyper_bias)
  Sep     T·l·d + T·M·2·(d·b + b·d_kv)          (+ T·M·2·(b + d_kv))
  Global  T·l·d + T·t' + M·t' + |h| + 2·t·(d·b + b·d_kv)
          |h| = 2t'·t + t·t; with hyper_bias |h| += 2t and the hypernetworks
          H_k, H_v also generate the biases of D, U and have their own:
          2·(t + 1)·(d·b + b + b·d_kv + d_kv)
  Prompt tuning  T·l·d
  HyperFormer++  T·t' + Σ over the 2 stacks s of
                 (L_s + 2)·t' + (3t'·t + t + t·t + t) + 2t + (t + 1)·(2·d·a + a + 3·d)
                 = T·t' + (L + 4)·t' + 2·(3t'·t + t·t + 4t) + 2·(t + 1)·(2·d·a + a + 3·d)
                 (task embeddings shared; per stack: layer and position embeddings,
                 projector, its layer norm, generators of D, d_b, U, u_b, LN gain, bias)
With d_kv = d (every T5 1.1 size but small) these are docs/METHODS.md's
Share T·l·d + M·4·d·b, Sep T·l·d + T·M·4·d·b and
Global T·l·d + T·t' + M·t' + |h| + 2·(2·d·b·t).
"""
from typing import Any, Dict

import jax
import numpy as np

from hyperprompt_t5x.model import conditioning
from hyperprompt_t5x.model import hyperformer
from hyperprompt_t5x.model import network


def closed_form_added(config: network.T5Config) -> int:
  """Added parameters of `config`'s conditioning method by the closed forms above."""
  cfg = config
  big_t, l, d, b = cfg.num_tasks, cfg.prompt_length, cfg.emb_dim, cfg.bottleneck
  d_kv = cfg.num_heads * cfg.head_dim
  te, t, a = cfg.task_embed_dim, cfg.layer_task_dim, cfg.adapter_dim
  m = conditioning.num_prompt_blocks(cfg)
  bias = int(cfg.hyper_bias)
  if cfg.method == 'none':
    return 0
  if cfg.method == 'prompt_tuning':
    return big_t * l * d
  if cfg.method == 'share':
    return big_t * l * d + m * 2 * (d * b + b * d_kv) + bias * m * 2 * (b + d_kv)
  if cfg.method == 'sep':
    return (big_t * l * d + big_t * m * 2 * (d * b + b * d_kv)
            + bias * big_t * m * 2 * (b + d_kv))
  if cfg.method == 'global':
    h = 2 * te * t + t * t + bias * 2 * t
    hyper = 2 * (t + bias) * (d * b + b * d_kv + bias * (b + d_kv))
    return big_t * l * d + big_t * te + m * te + h + hyper
  if cfg.method == 'hyperformer':
    total = big_t * te
    for num_layers in (cfg.num_encoder_layers, cfg.num_decoder_layers):
      embeddings = (num_layers + len(hyperformer.ADAPTER_POSITIONS)) * te
      projector = 3 * te * t + t + t * t + t
      generators = (t + 1) * (d * a + a + a * d + d + 2 * d)
      total += embeddings + projector + 2 * t + generators
    return total
  raise ValueError(f'unknown method {cfg.method!r}; expected one of {network.METHODS}')


def _size(tree) -> int:
  return int(sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree)))


def count_params(config: network.T5Config) -> Dict[str, Any]:
  """Parameter counts from `jax.eval_shape` of the init (no allocation; fast for xxl).

  added_fraction = added / backbone (the paper's "added parameters" ratio).
  """
  shapes = network.param_shapes(config)
  total = _size(shapes)
  added = _size(shapes.get(network.CONDITIONING_KEY, {}))
  prompts = _size(shapes.get(network.CONDITIONING_KEY, {}).get('prompts', {}))
  backbone = total - added
  closed = closed_form_added(config)
  cfg = config
  return {
      'total': total,
      'backbone': backbone,
      'added': added,
      'added_fraction': added / backbone,
      'prompt_params': prompts,
      'closed_form_added': closed,
      'matches_closed_form': closed == added,
      'method': cfg.method,
      'num_tasks': cfg.num_tasks,
      'prompt_length': cfg.prompt_length,
      'bottleneck': cfg.bottleneck,
      'task_embed_dim': cfg.task_embed_dim,
      'layer_task_dim': cfg.layer_task_dim,
      'adapter_dim': cfg.adapter_dim,
      'prompt_encoder': cfg.prompt_encoder,
      'prompt_decoder': cfg.prompt_decoder,
      'prompt_cross_attention': cfg.prompt_cross_attention,
      'hyper_bias': cfg.hyper_bias,
      'num_prompt_blocks': conditioning.num_prompt_blocks(cfg),
      'emb_dim': cfg.emb_dim,
      'num_heads': cfg.num_heads,
      'head_dim': cfg.head_dim,
      'mlp_dim': cfg.mlp_dim,
      'num_encoder_layers': cfg.num_encoder_layers,
      'num_decoder_layers': cfg.num_decoder_layers,
      'vocab_size': cfg.vocab_size,
  }
