"""Task conditioning: HyperPrompt Share/Sep/Global and multi-task prompt tuning.

One module, `TaskConditioning`, named `task_conditioning` in the parameter
tree, holds every conditioning parameter. It runs once per forward pass: it
generates the prompts (or adapter weights) for all T tasks and M blocks; each
layer then gathers its own by the batch's task ids (`layer_prompts`), so only
one layer's per-example prompts exist at a time. Nothing here depends on the
examples.

Conditioned blocks (`prompt_blocks`), in this order: encoder self-attention
layers (`prompt_encoder`), decoder self-attention layers (`prompt_decoder`),
decoder cross-attention layers (`prompt_cross_attention`); M is their count.

HyperPrompt (He et al. 2022), with d = emb_dim, d_kv = heads*head_dim,
l = prompt_length, b = bottleneck, t' = task_embed_dim, t = layer_task_dim:

* `prompts` [T, l, d]: the global prompt P_τ of each task.
* Share: `{key,value}_down` [M, d, b], `{key,value}_up` [M, b, d_kv];
  P_k(τ, m) = relu(P_τ D_k^m) U_k^m  (row-vector form of U·relu(D·P)).
* Sep: the same with a leading task axis, [T, M, d, b] and [T, M, b, d_kv].
* Global: `task_embedding` [T, t'], `layer_embedding` [M, t'], h = two-layer
  ReLU MLP 2t' -> t -> t (`layer_task_hidden`, `layer_task_out`), and linear
  hypernetworks `hyper_{key,value}_{down,up}` t -> d·b and t -> b·d_kv that
  generate D and U from I_τ^m = h([k_τ; z_m]).
* `hyper_bias` adds biases to h, D, U (Share/Sep: learned; Global: the
  hypernetworks get a bias and also generate the b + d_kv biases of D and U).

Initialisation (so that prompt key/value norms at step 0 are comparable to
the real ones, whose elements are ~N(0, 1) on a random-init T5): P_τ and all
embeddings ~N(0, 1); D fan-in scaled (var 1/d), U He-scaled (var 2/b: the
ReLU halves the hidden's second moment); h's second layer He-scaled so I has
unit variance; the Global hypernetworks are scaled so the *generated* D, U
have variance 1/d and 2/b. Prompt elements then have variance ~1 (ratio of
norms ~1 at random init, tested in 0.5-2x). On a restored backbone the
trainer rescales U (Global: and fits z_m) at step 0 (prompt_scale.py).
Generated weights are used as is: no normalisation at call time.

Multi-task prompt tuning: `prompts` [T, l, d] prepended to the encoder input
embeddings (normal(1) init, the token-embedding init scale); the prompt
positions are never masked, take relative positions 0..l-1 like tokens, and
stay in the encoder output that cross-attention reads.

HyperFormer++ (Karimi Mahabadi et al. 2021) lives in hyperformer.py.
"""
from typing import Any, Dict, List, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hyperprompt_t5x.model import layers
from hyperprompt_t5x.model.methods import HYPERPROMPT_METHODS

Array = jax.Array


def prompt_blocks(config) -> List[Tuple[str, int]]:
  """The conditioned attention blocks in prompt order: [(kind, layer)]."""
  blocks = []
  if config.method not in HYPERPROMPT_METHODS:
    return blocks
  if config.prompt_encoder:
    blocks += [('encoder', i) for i in range(config.num_encoder_layers)]
  if config.prompt_decoder:
    blocks += [('decoder', i) for i in range(config.num_decoder_layers)]
  if config.prompt_cross_attention:
    blocks += [('cross', i) for i in range(config.num_decoder_layers)]
  return blocks


def num_prompt_blocks(config) -> int:
  """M, the number of prompted attention blocks."""
  return len(prompt_blocks(config))


def _stacked_fan_in(scale: float, n_batch_axes: int, distribution: str = 'truncated_normal'):
  """Fan-in init for kernels [*stack, in, out] (stack axes are not fan axes)."""
  return nn.initializers.variance_scaling(
      scale, 'fan_in', distribution, batch_axis=tuple(range(n_batch_axes)))


def normal_init(std: float):
  """N(0, std^2) initialiser."""
  return nn.initializers.normal(stddev=std)


class Linear(nn.Module):
  """x W (+ b) with kernel [in, out] ('kernel', 'bias'); float32 (tiny, host of weights)."""
  features: int
  use_bias: bool
  kernel_axes: Tuple[str, str]
  kernel_init: Any = layers.default_kernel_init

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = layers.param_with_axes('kernel', self.kernel_init, (x.shape[-1], self.features),
                                    jnp.float32, axes=self.kernel_axes)
    # [..., in] -> [..., out]
    y = jnp.dot(x, kernel)
    if self.use_bias:
      bias = layers.param_with_axes('bias', nn.initializers.zeros, (self.features,),
                                    jnp.float32, axes=self.kernel_axes[1:])
      y = y + bias
    return y


def gather_tasks(x: Array, task_ids: Array, axis: int) -> Array:
  """Selects the rows of `x` along its task `axis` for each example: T -> batch."""
  return jnp.take(x, task_ids, axis=axis, mode='fill', fill_value=jnp.nan)


class TaskConditioning(nn.Module):
  """All conditioning parameters and their per-forward generation.

  `__call__(task_ids)` returns a dict (keys present only where used):
    'encoder', 'decoder', 'cross': (prompt_key, prompt_value), each
        [layers, T, l, heads, head_dim] float32, per task (HyperPrompt
        methods); each layer gathers its own by task id (`layer_prompts`), so
        one layer's per-example prompts are live at a time, not
        [layers, batch, l, heads·head_dim] for every block;
    'encoder_prefix': [batch, l, emb] (prompt tuning);
  """
  config: Any

  @nn.compact
  def __call__(self, task_ids: Array) -> Dict[str, Any]:
    cfg = self.config
    if cfg.method in HYPERPROMPT_METHODS:
      return self._hyperprompts(task_ids)
    if cfg.method == 'prompt_tuning':
      prompts = self._task_prompts()
      # [T, l, d] -> [batch, l, d]
      return {'encoder_prefix': gather_tasks(prompts, task_ids, axis=0)}
    return {}

  def _task_prompts(self) -> Array:
    cfg = self.config
    return layers.param_with_axes(
        'prompts', normal_init(1.0), (cfg.num_tasks, cfg.prompt_length, cfg.emb_dim),
        jnp.float32, axes=('tasks', 'prompt_len', 'embed'))

  def _bias(self, name: str, shape: Tuple[int, ...], axes: Tuple[str, ...]) -> Array:
    return layers.param_with_axes(name, nn.initializers.zeros, shape, jnp.float32, axes=axes)

  def _hyperprompts(self, task_ids: Array) -> Dict[str, Any]:
    cfg = self.config
    num_t, d, b = cfg.num_tasks, cfg.emb_dim, cfg.bottleneck
    d_kv = cfg.num_heads * cfg.head_dim
    blocks = prompt_blocks(cfg)
    num_m = len(blocks)
    prompts = self._task_prompts()  # [T, l, d]
    if cfg.method == 'global':
      layer_task = self._layer_task_embeddings(num_m)  # [M, T, t], shared by H_k and H_v

    out = {}
    for name in ('key', 'value'):
      if cfg.method == 'share':
        down = layers.param_with_axes(
            f'{name}_down', _stacked_fan_in(1.0, 1), (num_m, d, b), jnp.float32,
            axes=('hyper_blocks', 'embed', 'hyper_bottleneck'))
        up = layers.param_with_axes(
            f'{name}_up', _stacked_fan_in(2.0, 1), (num_m, b, d_kv), jnp.float32,
            axes=('hyper_blocks', 'hyper_bottleneck', 'joined_kv'))
        # Shared by tasks: [M, ...] -> [M, 1, ...] (broadcast in the einsums)
        down, up = down[:, None], up[:, None]
        if cfg.hyper_bias:
          down_b = self._bias(f'{name}_down_bias', (num_m, b), ('hyper_blocks', 'hyper_bottleneck'))
          up_b = self._bias(f'{name}_up_bias', (num_m, d_kv), ('hyper_blocks', 'joined_kv'))
          down_b, up_b = down_b[:, None], up_b[:, None]
      elif cfg.method == 'sep':
        down = layers.param_with_axes(
            f'{name}_down', _stacked_fan_in(1.0, 2), (num_t, num_m, d, b), jnp.float32,
            axes=('tasks', 'hyper_blocks', 'embed', 'hyper_bottleneck'))
        up = layers.param_with_axes(
            f'{name}_up', _stacked_fan_in(2.0, 2), (num_t, num_m, b, d_kv), jnp.float32,
            axes=('tasks', 'hyper_blocks', 'hyper_bottleneck', 'joined_kv'))
        # [T, M, ...] -> [M, T, ...]
        down, up = jnp.swapaxes(down, 0, 1), jnp.swapaxes(up, 0, 1)
        if cfg.hyper_bias:
          down_b = jnp.swapaxes(self._bias(
              f'{name}_down_bias', (num_t, num_m, b),
              ('tasks', 'hyper_blocks', 'hyper_bottleneck')), 0, 1)
          up_b = jnp.swapaxes(self._bias(
              f'{name}_up_bias', (num_t, num_m, d_kv),
              ('tasks', 'hyper_blocks', 'joined_kv')), 0, 1)
      else:  # global
        t = cfg.layer_task_dim
        extra_down = b if cfg.hyper_bias else 0
        extra_up = d_kv if cfg.hyper_bias else 0
        # Scaled so generated D ~ var 1/d and U ~ var 2/b (I has unit variance).
        gen_down = Linear(d * b + extra_down, cfg.hyper_bias, ('layer_task', 'hyper_generated'),
                          normal_init(1.0 / np.sqrt(t * d)), name=f'hyper_{name}_down')(layer_task)
        gen_up = Linear(b * d_kv + extra_up, cfg.hyper_bias, ('layer_task', 'hyper_generated'),
                        normal_init(np.sqrt(2.0 / (t * b))), name=f'hyper_{name}_up')(layer_task)
        # [M, T, d*b (+b)] -> [M, T, d, b] (+ [M, T, b])
        down = gen_down[..., :d * b].reshape(num_m, num_t, d, b)
        up = gen_up[..., :b * d_kv].reshape(num_m, num_t, b, d_kv)
        if cfg.hyper_bias:
          down_b, up_b = gen_down[..., d * b:], gen_up[..., b * d_kv:]
      # Share keeps D, U as [M, 1, ...]: contract without materialising a task axis.
      shared = down.shape[1] == 1
      # [T, l, d] x [M, T|1, d, b] -> [M, T, l, b]
      hidden = jnp.einsum('tld,mdb->mtlb' if shared else 'tld,mtdb->mtlb', prompts,
                          down[:, 0] if shared else down)
      if cfg.hyper_bias:
        hidden = hidden + down_b[:, :, None, :]
      hidden = jax.nn.relu(hidden)
      # [M, T, l, b] x [M, T|1, b, d_kv] -> [M, T, l, d_kv]
      generated = jnp.einsum('mtlb,mbk->mtlk' if shared else 'mtlb,mtbk->mtlk', hidden,
                             up[:, 0] if shared else up)
      if cfg.hyper_bias:
        generated = generated + up_b[:, :, None, :]
      # Per task, not per example: [M, T, l, d_kv] -> [M, T, l, heads, head_dim]
      out[name] = generated.reshape(generated.shape[:3] + (cfg.num_heads, cfg.head_dim))

    result, start = {}, 0
    for kind in ('encoder', 'decoder', 'cross'):
      count = sum(1 for k, _ in blocks if k == kind)
      if count:
        result[kind] = (out['key'][start:start + count], out['value'][start:start + count])
      start += count
    return result

  def _layer_task_embeddings(self, num_m: int) -> Array:
    """I_τ^m = h([k_τ; z_m]) for all blocks and tasks: [M, T, t]."""
    cfg = self.config
    num_t, te = cfg.num_tasks, cfg.task_embed_dim
    task_emb = layers.param_with_axes('task_embedding', normal_init(1.0), (num_t, te),
                                      jnp.float32, axes=('tasks', 'task_embed'))
    layer_emb = layers.param_with_axes('layer_embedding', normal_init(1.0), (num_m, te),
                                       jnp.float32, axes=('hyper_blocks', 'task_embed'))
    # [M, T, 2t']
    joined = jnp.concatenate([
        jnp.broadcast_to(task_emb[None], (num_m, num_t, te)),
        jnp.broadcast_to(layer_emb[:, None], (num_m, num_t, te))], axis=-1)
    return task_projector(joined, cfg.layer_task_dim, cfg.hyper_bias)


def task_projector(joined: Array, t: int, use_bias: bool) -> Array:
  """Two-layer ReLU MLP [..., n·t'] -> [..., t] with unit-variance output at init.

  Called inside a compact module: its two layers become that module's
  `layer_task_hidden` and `layer_task_out`.
  """
  # Distinct names for the two sides of the square kernel: flax's axis rules
  # reject a logical name that repeats within one array.
  hidden = jax.nn.relu(Linear(t, use_bias, ('task_embed', 'layer_task_hidden'),
                              name='layer_task_hidden')(joined))
  return Linear(t, use_bias, ('layer_task_hidden', 'layer_task'),
                nn.initializers.variance_scaling(2.0, 'fan_in', 'truncated_normal'),
                name='layer_task_out')(hidden)


def layer_prompts(prompts: Optional[Tuple[Array, Array]], task_ids: Array, dtype
                  ) -> Tuple[Optional[Array], Optional[Array]]:
  """One layer's (key, value) prompts [T, l, heads, kv] -> per example [batch, l, heads, kv].

  Gathered in float32, then cast to the compute dtype: the gather's gradient
  (a sum over the examples of each task) accumulates in float32.
  """
  if prompts is None:
    return None, None
  return tuple(jnp.asarray(gather_tasks(p, task_ids, axis=0), dtype) for p in prompts)
