"""Greedy decoding with the key/value cache, and teacher-forced logits.

The conditioning (prompts / adapter weights) is computed once per call and
reused by every decoding step; the cache of each prompted self-attention holds
the prompt keys/values in its first l columns (written when the cache is
created) followed by the decoder tokens.
"""
import functools
from typing import Any, Optional

import jax
from jax import lax
import jax.numpy as jnp

from hyperprompt_t5x.model import network

Array = jax.Array


def _host_check(config: network.T5Config, task_ids):
  if task_ids is not None and config.conditioned:
    concrete = network.concrete_value(task_ids)
    if concrete is not None:
      network.check_task_ids(concrete, config.num_tasks)


@functools.partial(jax.jit, static_argnums=0)
def _teacher_forced(config, params, encoder_input_tokens, decoder_input_tokens,
                    decoder_target_tokens, task_ids):
  model = network.Transformer(config)
  return model.apply({'params': params}, encoder_input_tokens, decoder_input_tokens,
                     decoder_target_tokens, task_ids, enable_dropout=False)


def teacher_forced_logits(config: network.T5Config, params, encoder_input_tokens,
                          decoder_input_tokens, decoder_target_tokens, task_ids=None) -> Array:
  """Logits [batch, target_len, vocab] of the whole target at once (no dropout; jitted)."""
  _host_check(config, task_ids)
  return _teacher_forced(config, params, encoder_input_tokens, decoder_input_tokens,
                         decoder_target_tokens, task_ids)


def init_cache(config: network.T5Config, params, encoded, encoder_input_tokens, task_ids,
               max_decode_length: int, conditioning=None):
  """The 'cache' collection for `max_decode_length` steps (T5X protocol).

  Created by one decode=True call on full-length dummy decoder inputs: the
  cache is zeros except the prompt columns and `cache_index` (= l where
  prompted). Under jit XLA keeps only what the cache needs of that call.
  """
  model = network.Transformer(config)
  batch = encoder_input_tokens.shape[0]
  dummy = jnp.ones((batch, max_decode_length), jnp.int32)
  _, variables = model.apply(
      {'params': params}, encoded, encoder_input_tokens, dummy, dummy, task_ids,
      enable_dropout=False, decode=True, max_decode_length=max_decode_length,
      conditioning=conditioning, mutable=['cache'], method=model.decode)
  return variables['cache']


@functools.partial(jax.jit, static_argnums=(0, 4, 6))
def _greedy(config, params, encoder_input_tokens, task_ids, max_decode_length, eos_id,
            return_logits):
  model = network.Transformer(config)
  batch = encoder_input_tokens.shape[0]
  variables = {'params': params}
  conditioning = model.apply(variables, task_ids, batch, method=model.compute_conditioning)
  encoded = model.apply(variables, encoder_input_tokens, task_ids, enable_dropout=False,
                        conditioning=conditioning, method=model.encode)
  cache = init_cache(config, params, encoded, encoder_input_tokens, task_ids,
                     max_decode_length, conditioning)
  tokens = jnp.zeros((batch, max_decode_length), jnp.int32)
  logits_buf = (jnp.zeros((batch, max_decode_length, config.vocab_size), jnp.float32)
                if return_logits else jnp.zeros((), jnp.float32))

  def cond_fn(state):
    i, _, _, _, _, done = state
    return jnp.logical_and(i < max_decode_length, jnp.logical_not(jnp.all(done)))

  def body_fn(state):
    i, cache, tokens, logits_buf, cur, done = state
    # [batch] -> [batch, 1]: one decoder position per step (0 = BOS at step 0).
    step_tokens = cur[:, None]
    logits, new_vars = model.apply(
        {'params': params, 'cache': cache}, encoded, encoder_input_tokens, step_tokens,
        step_tokens, task_ids, enable_dropout=False, decode=True,
        max_decode_length=max_decode_length, conditioning=conditioning,
        mutable=['cache'], method=model.decode)
    # [batch, 1, vocab] -> [batch]
    nxt = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
    nxt = jnp.where(done, 0, nxt)
    tokens = lax.dynamic_update_slice(tokens, nxt[:, None], (0, i))
    if return_logits:
      logits_buf = lax.dynamic_update_slice(
          logits_buf, jnp.asarray(logits, jnp.float32), (0, i, 0))
    done = jnp.logical_or(done, nxt == eos_id)
    return i + 1, new_vars['cache'], tokens, logits_buf, nxt, done

  state = (jnp.array(0, jnp.int32), cache, tokens, logits_buf,
           jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), bool))
  _, _, tokens, logits_buf, _, _ = lax.while_loop(cond_fn, body_fn, state)
  return (tokens, logits_buf) if return_logits else tokens


def greedy_decode(config: network.T5Config, params, encoder_input_tokens,
                  task_ids: Optional[Any], max_decode_length: int, eos_id: int = 1,
                  *, return_logits: bool = False):
  """Cached greedy decoding -> int32 tokens [batch, max_decode_length].

  Starts from BOS = 0, writes the argmax each step, stops writing after a
  row emits `eos_id` (the EOS is kept, later positions are 0) and stops the
  loop when every row is done. Dropout is off. With return_logits=True also
  returns the float32 step logits [batch, max_decode_length, vocab] (zeros
  after the loop stops). Jitted with config, max_decode_length and
  return_logits static (eos_id is traced); callable under an outer jit too.
  """
  if int(max_decode_length) < 1:
    raise ValueError(f'max_decode_length must be >= 1, got {max_decode_length}')
  _host_check(config, task_ids)
  encoder_input_tokens = jnp.asarray(encoder_input_tokens, jnp.int32)
  if task_ids is None:
    if config.conditioned and config.num_tasks != 1:
      raise ValueError(f'task_ids is required: method={config.method!r} with '
                       f'num_tasks={config.num_tasks}')
    task_ids = jnp.zeros((encoder_input_tokens.shape[0],), jnp.int32)
  task_ids = jnp.asarray(task_ids, jnp.int32)
  return _greedy(config, params, encoder_input_tokens, task_ids, int(max_decode_length),
                 jnp.asarray(eos_id, jnp.int32), bool(return_logits))
