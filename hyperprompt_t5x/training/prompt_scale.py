"""Scale of the hyper-prompts against the real keys/values, and its calibration.

ratio[kind][layer] for k and v = mean per-head L2 norm of the prompt keys
(values) over mean per-head norm of the real keys (values) at the non-padding
positions, on one batch; kinds as analysis.py (encoder, decoder, cross).

At random initialisation the generators are scaled so the ratio is about 1
(conditioning.py). A restored backbone has its own key/value scale (a trained
T5's keys are not unit-variance), so at step 0 of a run that restores one
(INITIAL_CHECKPOINT_PATH) the trainer logs the ratios on the first batch and
`calibrate` brings them to 1 there:

* Share/Sep: U (and its bias) divided by each block's ratio (U is per block;
  prompt k/v are linear in U).
* Global: one hypernetwork generates every block's U, so dividing it fixes
  only the mean over blocks; the per-block spread (0.3-2.6x on the real T5X
  checkpoint) is then removed by fitting the layer embeddings z_m, the only
  per-block parameters, so each block's prompt norms match its real ones
  (100 Adam steps on the prompt generator alone: prompts do not depend on
  the examples). A data-dependent initialisation of z; the parameter tree
  and the method are unchanged. z_m sets a block's prompt scale, not the
  balance of its keys and values (H_k and H_v share I_τ^m, and the norm of
  a random projection hardly depends on its input's direction): a block
  whose key and value ratios differ keeps their quotient.

The ratio is then exactly 1 (Share/Sep) or within the fit's tolerance
(Global) in the first layer of each stack, and within a few % after (a later
layer's real k/v move a little with the earlier layers' rescaled prompts;
Global, whose fit moves them more, is measured and fitted twice).
"""
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import optax

from hyperprompt_t5x.evaluation import analysis
from hyperprompt_t5x.model import conditioning
from hyperprompt_t5x.model import models
from hyperprompt_t5x.model import network
from hyperprompt_t5x.model.methods import HYPERPROMPT_METHODS

Ratios = Dict[str, Dict[str, Any]]  # {kind: {'key': [layers], 'value': [layers]}}


def norm_ratios(config: network.T5Config, params, batch: Mapping[str, Any]) -> Ratios:
  """{kind: {'key': [L], 'value': [L]}} prompt/real norm ratios on `batch` (jit-able)."""
  if config.method not in HYPERPROMPT_METHODS:
    return {}
  enc, tgt = batch['encoder_input_tokens'], batch['decoder_target_tokens']
  _, state = network.Transformer(config).apply(
      {'params': params}, enc, batch['decoder_input_tokens'], tgt, batch.get('task_ids'),
      **models.packing_features(batch), enable_dropout=False, mutable=['intermediates'])
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


def prompt_norms(config: network.T5Config, cond_params, task_ids: jax.Array
                 ) -> Dict[str, jax.Array]:
  """{'key', 'value'}: [M] mean per-head prompt norm per block over the examples of
  `task_ids` (the numerator of norm_ratios), from the conditioning params alone."""
  prompts = conditioning.TaskConditioning(config).apply({'params': cond_params}, task_ids)
  # Each example weighs its task's prompts: [T] fraction of the batch.
  weights = jnp.mean(jax.nn.one_hot(task_ids.reshape(-1), config.num_tasks), axis=0)
  out = {}
  for i, name in enumerate(('key', 'value')):
    per_kind = []
    for kind in ('encoder', 'decoder', 'cross'):
      if kind in prompts:
        # [layers, T, l, heads, kv] -> [layers, T] -> [layers]; a zero row (every
        # ReLU unit off) has norm 0 and gradient 0, not linalg.norm's NaN.
        squares = jnp.sum(jnp.square(prompts[kind][i]), axis=-1)
        norms = jnp.mean(jnp.sqrt(squares + 1e-20), axis=(2, 3))
        per_kind.append(norms @ weights)
    out[name] = jnp.concatenate(per_kind)
  return out


def fit_layer_embeddings(config: network.T5Config, cond_params, task_ids: jax.Array,
                         targets: Mapping[str, jax.Array], steps: int = 100,
                         learning_rate: float = 0.1):
  """Global: cond_params with `layer_embedding` [M, t'] fitted (Adam on squared log
  error) so each block's prompt key and value norms equal `targets` ({name: [M]})."""
  log_targets = {k: jnp.log(v) for k, v in targets.items()}

  def loss(z):
    norms = prompt_norms(config, {**cond_params, 'layer_embedding': z}, task_ids)
    return sum(jnp.sum((jnp.log(norms[k]) - log_targets[k]) ** 2) for k in norms)

  opt = optax.adam(learning_rate)

  def step(carry, _):
    z, opt_state = carry
    grads = jax.grad(loss)(z)
    updates, opt_state = opt.update(grads, opt_state)
    return (optax.apply_updates(z, updates), opt_state), None

  z0 = cond_params['layer_embedding']
  (z, _), _ = jax.lax.scan(step, (z0, opt.init(z0)), None, length=steps)
  return {**cond_params, 'layer_embedding': z}


def calibrate(config: network.T5Config, params, ratios: Ratios,
              task_ids: Optional[jax.Array] = None):
  """params with the prompts rescaled by the measured ratios: U per block (Share/Sep);
  the hypernetworks by the mean, then the layer embeddings fitted to the blocks' real
  norms on the examples of `task_ids` (Global; the batch the ratios were measured on)."""
  if not ratios:
    return params
  cond = dict(params[network.CONDITIONING_KEY])
  if config.method == 'global':
    if task_ids is None:
      if config.num_tasks != 1:
        raise ValueError('calibrate: HyperPrompt-Global with num_tasks='
                         f'{config.num_tasks} needs the task_ids of the measured batch')
      task_ids = jnp.zeros((1,), jnp.int32)
    r = {name: per_block(ratios, name) for name in ('key', 'value')}  # [M] each
    targets = {k: v / r[k] for k, v in prompt_norms(config, cond, task_ids).items()}
    for name in ('key', 'value'):
      cond[f'hyper_{name}_up'] = {k: v / jnp.mean(r[name])
                                  for k, v in cond[f'hyper_{name}_up'].items()}
    cond = fit_layer_embeddings(config, cond, task_ids, targets)
    return {**params, network.CONDITIONING_KEY: cond}
  for name in ('key', 'value'):
    r = per_block(ratios, name)  # [M]
    # share: [M, ...]; sep: [T, M, ...] (the block axis first after tasks)
    axis = 0 if config.method == 'share' else 1
    for leaf in (f'{name}_up', f'{name}_up_bias'):
      if leaf in cond:
        shape = [1] * cond[leaf].ndim
        shape[axis] = r.shape[0]
        cond[leaf] = cond[leaf] / r.reshape(shape)
  return {**params, network.CONDITIONING_KEY: cond}


def calibrate_first_batch(config: network.T5Config, params, batch: Mapping[str, Any],
                          rescale: bool) -> Tuple[Any, Optional[str]]:
  """Step 0 of a run from a restored backbone, for both trainers: (params, log line).

  Measures the ratios on `batch` (global arrays); unless `rescale` is False
  (CALIBRATE_PROMPT_SCALE), calibrates and measures again. The params keep
  their shardings. (params, None) for methods without hyper-prompts.
  """
  ratios_fn = jax.jit(lambda p, b: norm_ratios(config, p, b))
  before = ratios_fn(params, batch)
  if not before:
    return params, None
  message = ('prompt/real key-value norm ratio per block on the first batch: '
             f'{format_ratios(before)}')
  if not rescale:
    return params, f'{message}; not rescaled (CALIBRATE_PROMPT_SCALE = False)'
  shardings = jax.tree_util.tree_map(lambda x: x.sharding, params)
  calibrate_fn = jax.jit(lambda p, r, t: calibrate(config, p, r, t), out_shardings=shardings)
  # Global's fit moves the earlier blocks' prompts more than Share/Sep's exact rescale,
  # and with them the later blocks' real keys: a second round measures and fits again.
  ratios = before
  for _ in range(2 if config.method == 'global' else 1):
    params = calibrate_fn(params, ratios, batch.get('task_ids'))
    ratios = ratios_fn(params, batch)
  return params, f'{message}; after rescaling: {format_ratios(ratios)}'


def format_ratios(ratios: Mapping[str, Mapping[str, Any]]) -> str:
  """One line per kind: 'encoder k 0.98 1.02 | v 1.01 0.97'."""
  return '; '.join(
      f'{kind} k ' + ' '.join(f'{float(x):.2f}' for x in r['key']) +
      ' | v ' + ' '.join(f'{float(x):.2f}' for x in r['value'])
      for kind, r in ratios.items())
