"""Scale of the hyper-prompts against the real keys/values, and its calibration.

ratio[kind][layer] for k and v = mean per-head L2 norm of the prompt keys
(values) over mean per-head norm of the real keys (values) at the non-padding
positions, on one batch; kinds as analysis.py (encoder, decoder, cross).

At random initialisation the generators are scaled so the ratio is about 1
(conditioning.py). A restored backbone has its own key/value scale (a trained
T5's keys are not unit-variance), so at step 0 of a run that restores one
(INITIAL_CHECKPOINT_PATH) the trainer logs the ratios on the first batch and
`calibrate` rescales the generated up-projections so they are 1 there:
per block for Share/Sep (U is per block), by the mean over blocks for
Global (one hypernetwork generates every block's U). Prompt k/v are linear
in U and its bias, so for Share/Sep the rescaled ratio is exactly 1 in the
first layer of each stack and within a few % after (a later layer's real k/v move
a little with the earlier layers' rescaled prompts).
"""
from typing import Any, Dict, Mapping

import jax
import jax.numpy as jnp

from hyperprompt_t5x import analysis
from hyperprompt_t5x import conditioning
from hyperprompt_t5x import network

Ratios = Dict[str, Dict[str, Any]]  # {kind: {'key': [layers], 'value': [layers]}}


def norm_ratios(config: network.T5Config, params, batch: Mapping[str, Any]) -> Ratios:
  """{kind: {'key': [L], 'value': [L]}} prompt/real norm ratios on `batch` (jit-able)."""
  if config.method not in conditioning.HYPERPROMPT_METHODS:
    return {}
  enc, tgt = batch['encoder_input_tokens'], batch['decoder_target_tokens']
  _, state = network.Transformer(config).apply(
      {'params': params}, enc, batch['decoder_input_tokens'], tgt, batch.get('task_ids'),
      enable_dropout=False, mutable=['intermediates'])
  inter = state['intermediates']
  key_valid = {'encoder': enc > 0, 'decoder': tgt > 0, 'cross': enc > 0}
  num_l = config.prompt_length
  out: Ratios = {}
  for kind in analysis.prompted_kinds(config):
    stack, module = analysis.KINDS[kind]
    valid = key_valid[kind].astype(jnp.float32)[..., None]  # [batch, k, 1]
    out[kind] = {}
    for name in ('key', 'value'):
      ratios = []
      for lyr in range(config.num_encoder_layers if stack == 'encoder'
                       else config.num_decoder_layers):
        (norms,) = inter[stack][f'layers_{lyr}'][module][f'{name}_norms']  # [b, l + k, h]
        prompt = jnp.mean(norms[:, :num_l])
        real = jnp.sum(norms[:, num_l:] * valid) / jnp.maximum(
            jnp.sum(valid) * norms.shape[-1], 1.0)
        ratios.append(prompt / real)
      out[kind][name] = jnp.stack(ratios)
  return out


def per_block(ratios: Ratios, name: str) -> jax.Array:
  """[M] ratios of `name` in conditioning.prompt_blocks order (encoder, decoder, cross)."""
  return jnp.concatenate([ratios[k][name] for k in ('encoder', 'decoder', 'cross')
                          if k in ratios])


def calibrate(config: network.T5Config, params, ratios: Ratios):
  """params with the prompt up-projections divided by the measured ratios."""
  if not ratios:
    return params
  cond = dict(params[network.CONDITIONING_KEY])
  for name in ('key', 'value'):
    r = per_block(ratios, name)  # [M]
    if config.method == 'global':
      gen = dict(cond[f'hyper_{name}_up'])
      cond[f'hyper_{name}_up'] = {k: v / jnp.mean(r) for k, v in gen.items()}
      continue
    # share: [M, ...]; sep: [T, M, ...] (the block axis first after tasks)
    axis = 0 if config.method == 'share' else 1
    for leaf in (f'{name}_up', f'{name}_up_bias'):
      if leaf in cond:
        shape = [1] * cond[leaf].ndim
        shape[axis] = r.shape[0]
        cond[leaf] = cond[leaf] / r.reshape(shape)
  return {**params, network.CONDITIONING_KEY: cond}


def format_ratios(ratios: Mapping[str, Mapping[str, Any]]) -> str:
  """One line per kind: 'encoder k 0.98 1.02 | v 1.01 0.97'."""
  return '; '.join(
      f'{kind} k ' + ' '.join(f'{float(x):.2f}' for x in r['key']) +
      ' | v ' + ' '.join(f'{float(x):.2f}' for x in r['value'])
      for kind, r in ratios.items())
