"""T5 1.1 building blocks, T5X-compatible, with attention that takes prompt keys/values.

Parameter names, shapes (2-D kernels) and logical axis names follow T5X's
`t5x/examples/t5/layers.py`, so public T5X checkpoints restore by name. The
math is standard T5 1.1: RMS norm (eps 1e-6, float32), gated-GELU MLP with
`jax.nn.gelu(approximate=True)`, bucketed relative position biases, and
1/sqrt(head_dim) folded into the query kernel initialiser (no scaling at call
time).

The one addition is `MultiHeadDotProductAttention(..., prompt_key=,
prompt_value=)`: hyper-prompts `[batch, l, heads, head_dim]` are prepended to
the keys and values after projection (in cached decoding they are the first
l columns of the cache, written once). Their columns get zero
relative-position bias and are never masked.

Packed rows (several examples per row, seqio's segment ids): `make_segment_mask`
gives the block-diagonal mask. The relative-position bias stays one
[1, heads, q, k] table from index offsets: segments are contiguous, so within
a segment the index offset k - q equals the position offset, and pairs across
segments are masked. Prompt columns stay unmasked in every segment.
"""
import functools
from typing import Any, Callable, Iterable, Optional, Sequence, Tuple, Union

import flax.linen as nn
from flax.linen import partitioning as nn_partitioning
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
DType = Any
Initializer = Callable[..., Array]

param_with_axes = nn_partitioning.param_with_axes
variable_with_axes = nn_partitioning.variable_with_axes

# T5X's initialisers.
default_kernel_init = nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal')
attention_kernel_init = nn.initializers.variance_scaling(1.0, 'fan_in', 'normal')
relpos_init = nn.initializers.variance_scaling(1.0, 'fan_avg', 'uniform')

ATTENTION_IMPLS = ('xla', 'dot_product_attention', 'cudnn')
NEG_INF = -1e10  # T5X's mask value (finite, so fully masked rows stay NaN-free).


def _normalize_axes(axes: Iterable[int], ndim: int) -> Tuple[int, ...]:
  return tuple(ax if ax >= 0 else ndim + ax for ax in axes)


def _canonicalize_tuple(x):
  return tuple(x) if isinstance(x, Iterable) else (x,)


class DenseGeneral(nn.Module):
  """A linear map over several axes with a 2-D stored kernel (T5X layout).

  Attributes:
    features: output feature size(s).
    axis: input axes contracted.
    kernel_axes: logical names of the kernel as stored (2-D: in, out).
  """
  features: Union[Iterable[int], int]
  axis: Union[Iterable[int], int] = -1
  dtype: DType = jnp.float32
  kernel_init: Initializer = default_kernel_init
  kernel_axes: Tuple[str, ...] = ()

  @nn.compact
  def __call__(self, inputs: Array) -> Array:
    features = _canonicalize_tuple(self.features)
    axis = _normalize_axes(_canonicalize_tuple(self.axis), inputs.ndim)
    inputs = jnp.asarray(inputs, self.dtype)
    kernel_shape = tuple(inputs.shape[ax] for ax in axis) + features
    kernel_param_shape = (int(np.prod([inputs.shape[ax] for ax in axis])),
                          int(np.prod(features)))
    kernel = param_with_axes('kernel', self.kernel_init, kernel_param_shape,
                             jnp.float32, axes=self.kernel_axes)
    # [in_flat, out_flat] -> [*in_dims, *out_dims]
    kernel = jnp.reshape(jnp.asarray(kernel, self.dtype), kernel_shape)
    contract = tuple(range(len(axis)))
    return lax.dot_general(inputs, kernel, ((axis, contract), ((), ())))


class Embed(nn.Module):
  """Token embedding `embedding [vocab, embed]`; `attend` gives tied logits."""
  num_embeddings: int
  features: int
  dtype: DType = jnp.float32
  attend_dtype: Optional[DType] = None
  embedding_init: Initializer = nn.initializers.normal(stddev=1.0)
  one_hot: bool = False

  def setup(self):
    self.embedding = param_with_axes(
        'embedding', self.embedding_init, (self.num_embeddings, self.features),
        jnp.float32, axes=('vocab', 'embed'))

  def __call__(self, inputs: Array) -> Array:
    if not jnp.issubdtype(inputs.dtype, jnp.integer):
      raise ValueError(f'Embed expects integer token ids, got dtype {inputs.dtype}')
    embedding = jnp.asarray(self.embedding, self.dtype)
    if self.one_hot:
      # [batch, length] -> [batch, length, vocab] @ [vocab, embed]
      iota = lax.iota(jnp.int32, self.num_embeddings)
      one_hot = jnp.array(inputs[..., None] == iota, dtype=self.dtype)
      output = jnp.dot(one_hot, embedding)
    else:
      # [batch, length] -> [batch, length, embed]
      output = jnp.take(embedding, inputs, axis=0)
    return nn.with_logical_constraint(output, ('batch', 'length', 'embed'))

  def attend(self, query: Array) -> Array:
    """[batch, length, embed] -> [batch, length, vocab] against the embedding."""
    dtype = self.attend_dtype if self.attend_dtype is not None else self.dtype
    query = jnp.asarray(query, dtype)
    embedding = jnp.asarray(self.embedding, dtype)
    return jnp.dot(query, embedding.T)


class LayerNorm(nn.Module):
  """T5 RMS norm (no mean, no bias): float32 statistics, eps 1e-6."""
  epsilon: float = 1e-6
  dtype: DType = jnp.float32
  scale_init: Initializer = nn.initializers.ones

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = jnp.asarray(x, jnp.float32)
    features = x.shape[-1]
    mean2 = jnp.mean(lax.square(x), axis=-1, keepdims=True)
    y = jnp.asarray(x * lax.rsqrt(mean2 + self.epsilon), self.dtype)
    scale = param_with_axes('scale', self.scale_init, (features,), jnp.float32,
                            axes=('embed',))
    return y * jnp.asarray(scale, self.dtype)


def _activation(name: str) -> Callable[[Array], Array]:
  if name == 'linear':
    return lambda x: x
  if name == 'gelu':
    return functools.partial(jax.nn.gelu, approximate=True)
  fn = getattr(jax.nn, name, None)
  if fn is None:
    raise ValueError(f'unknown MLP activation {name!r} (use gelu, linear, relu, ...)')
  return fn


class MlpBlock(nn.Module):
  """Gated MLP: prod_i act_i(x W_i) then W_o (`wi_0`, `wi_1`, `wo`; `wi` if one act)."""
  intermediate_dim: int = 2048
  activations: Sequence[str] = ('gelu', 'linear')
  kernel_init: Initializer = default_kernel_init
  intermediate_dropout_rate: float = 0.1
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, inputs: Array, deterministic: bool = False) -> Array:
    activations = []
    for idx, act in enumerate(self.activations):
      name = 'wi' if len(self.activations) == 1 else f'wi_{idx}'
      # [batch, length, embed] -> [batch, length, mlp]
      x = DenseGeneral(self.intermediate_dim, dtype=self.dtype,
                       kernel_init=self.kernel_init, kernel_axes=('embed', 'mlp'),
                       name=name)(inputs)
      activations.append(_activation(act)(x))
    x = functools.reduce(lambda a, b: a * b, activations)
    x = nn.Dropout(rate=self.intermediate_dropout_rate, broadcast_dims=(-2,))(
        x, deterministic=deterministic)
    x = nn.with_logical_constraint(x, ('batch', 'length', 'mlp'))
    # [batch, length, mlp] -> [batch, length, embed]
    return DenseGeneral(inputs.shape[-1], dtype=self.dtype, kernel_init=self.kernel_init,
                        kernel_axes=('mlp', 'embed'), name='wo')(x)


def relative_position_bucket(relative_position: np.ndarray, bidirectional: bool = True,
                             num_buckets: int = 32, max_distance: int = 128) -> np.ndarray:
  """T5's bucketing of (memory - query) offsets, on the host (shapes are static)."""
  ret = 0
  n = -relative_position
  if bidirectional:
    num_buckets //= 2
    ret += (n < 0).astype(np.int32) * num_buckets
    n = np.abs(n)
  else:
    n = np.maximum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  val_if_large = max_exact + (
      np.log(n.astype(np.float32) / max_exact + np.finfo(np.float32).eps) /
      np.log(max_distance / max_exact) * (num_buckets - max_exact)).astype(np.int32)
  val_if_large = np.minimum(val_if_large, num_buckets - 1)
  return ret + np.where(is_small, n, val_if_large)


class RelativePositionBiases(nn.Module):
  """One `rel_embedding [heads, buckets]` table per stack -> bias [1, heads, q, k]."""
  num_buckets: int
  max_distance: int
  num_heads: int
  dtype: DType = jnp.float32
  embedding_init: Initializer = relpos_init

  @nn.compact
  def __call__(self, qlen: int, klen: int, bidirectional: bool = True) -> Array:
    context_position = np.arange(qlen, dtype=np.int32)[:, None]
    memory_position = np.arange(klen, dtype=np.int32)[None, :]
    rp_bucket = relative_position_bucket(memory_position - context_position,
                                         bidirectional, self.num_buckets, self.max_distance)
    table = param_with_axes('rel_embedding', self.embedding_init,
                            (self.num_heads, self.num_buckets), jnp.float32,
                            axes=('heads', 'relpos_buckets'))
    # [heads, buckets] gathered by [q, k] buckets -> [heads, q, k]
    values = jnp.take(table, jnp.asarray(rp_bucket), axis=1)
    return jnp.asarray(values[None], self.dtype)


def make_attention_mask(query_input: Array, key_input: Array,
                        pairwise_fn: Callable = jnp.multiply, dtype: DType = jnp.float32
                        ) -> Array:
  """[batch, q], [batch, k] -> [batch, 1, q, k]."""
  mask = pairwise_fn(jnp.expand_dims(query_input, -1), jnp.expand_dims(key_input, -2))
  return jnp.expand_dims(mask, -3).astype(dtype)


def make_causal_mask(x: Array, dtype: DType = jnp.float32) -> Array:
  idxs = jnp.broadcast_to(jnp.arange(x.shape[-1], dtype=jnp.int32), x.shape)
  return make_attention_mask(idxs, idxs, jnp.greater_equal, dtype=dtype)


def combine_masks(*masks: Optional[Array], dtype: DType = jnp.float32) -> Optional[Array]:
  masks = [m for m in masks if m is not None]
  if not masks:
    return None
  mask = masks[0]
  for other in masks[1:]:
    mask = jnp.logical_and(mask, other)
  return mask.astype(dtype)


def make_segment_mask(query_segment_ids: Optional[Array], key_segment_ids: Optional[Array],
                      dtype: DType = jnp.float32) -> Optional[Array]:
  """Block-diagonal packing mask [batch, 1, q, k]: same segment id (None when unpacked)."""
  if query_segment_ids is None:
    return None
  return make_attention_mask(query_segment_ids, key_segment_ids, jnp.equal, dtype=dtype)


def make_decoder_mask(decoder_target_tokens: Array, dtype: DType = jnp.float32,
                      decoder_segment_ids: Optional[Array] = None) -> Array:
  """Causal, non-padding and (packed) same-segment mask: [batch, 1, len, len]."""
  return combine_masks(
      make_causal_mask(decoder_target_tokens, dtype=dtype),
      make_attention_mask(decoder_target_tokens > 0, decoder_target_tokens > 0, dtype=dtype),
      make_segment_mask(decoder_segment_ids, decoder_segment_ids, dtype=dtype),
      dtype=dtype)


def _prepend_prompt_columns(mask: Optional[Array], bias: Optional[Array],
                            prompt_len: int) -> Tuple[Optional[Array], Optional[Array]]:
  """Adds `prompt_len` leading key columns: mask 1 (never masked), bias 0."""
  if mask is not None:
    # [batch, 1, q, k] -> [batch, 1, q, l + k]
    ones = jnp.ones(mask.shape[:-1] + (prompt_len,), mask.dtype)
    mask = jnp.concatenate([ones, mask], axis=-1)
  if bias is not None:
    # [b|1, heads, q, k] -> [b|1, heads, q, l + k]
    zeros = jnp.zeros(bias.shape[:-1] + (prompt_len,), bias.dtype)
    bias = jnp.concatenate([zeros, bias], axis=-1)
  return mask, bias


def _mask_to_bias(mask: Optional[Array], bias: Optional[Array], dtype: DType
                  ) -> Optional[Array]:
  """Mask (1 keep / 0 drop) and additive bias -> one additive bias (T5X style)."""
  out = None
  if mask is not None:
    out = lax.select(mask > 0, jnp.zeros(mask.shape, dtype),
                     jnp.full(mask.shape, NEG_INF, dtype))
  if bias is not None:
    bias = jnp.asarray(bias, dtype)
    out = bias if out is None else out + bias
  return out


def attention_weights(query: Array, key: Array, bias: Optional[Array],
                      float32_logits: bool, dtype: DType) -> Array:
  """softmax(q kᵀ + bias): [batch, q, heads, kv] x [batch, k, heads, kv] -> [batch, heads, q, k]."""
  # float32 logits from the operands as they are: products of bf16 numbers are
  # exact in float32, so this equals casting q, k first, at the bf16 matmul rate.
  logits_dtype = jnp.float32 if float32_logits else None
  # [batch, q, heads, kv] x [batch, k, heads, kv] -> [batch, heads, q, k]
  logits = jnp.einsum('bqhd,bkhd->bhqk', query, key, preferred_element_type=logits_dtype)
  if bias is not None:
    logits = logits + jnp.asarray(bias, logits.dtype)
  return jax.nn.softmax(logits).astype(dtype)


def dot_product_attention(query: Array, key: Array, value: Array,
                          bias: Optional[Array] = None, dropout_rng=None,
                          dropout_rate: float = 0., deterministic: bool = False,
                          dtype: DType = jnp.float32, float32_logits: bool = False,
                          impl: str = 'xla') -> Array:
  """softmax(q kᵀ + bias) v without scaling (T5 folds it into the query init).

  query [batch, q, heads, kv], key/value [batch, k, heads, kv],
  bias broadcastable to [batch, heads, q, k] -> [batch, q, heads, kv].

  impl 'xla' is the einsum softmax (with dropout on the attention weights, as
  T5X). 'dot_product_attention' / 'cudnn' call `jax.nn.dot_product_attention`
  (implementation None / 'cudnn'); it has no attention-weight dropout, so
  while that dropout is active (training with dropout_rate > 0) the 'xla'
  path is used instead, keeping the two impls the same function.
  """
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f'attention_impl={impl!r}; expected one of {ATTENTION_IMPLS}')
  use_dropout = not deterministic and dropout_rate > 0.
  if impl != 'xla' and not use_dropout:
    # q, k, v stay in their (compute) dtype: jax.nn.dot_product_attention computes
    # bf16 x bf16 -> float32 logits and a float32 softmax itself, as the 'xla' path
    # below; float32 copies would only halve the matmul rate. The bias is float32
    # with float32_logits (added to the float32 logits); cuDNN wants the operand dtype.
    q, k, v = (jnp.asarray(t, query.dtype) for t in (query, key, value))
    bias_dtype = jnp.float32 if float32_logits and impl != 'cudnn' else query.dtype
    b = None if bias is None else jnp.asarray(bias, bias_dtype)
    out = jax.nn.dot_product_attention(
        q, k, v, bias=b, scale=1.0,
        implementation='cudnn' if impl == 'cudnn' else None)
    return jnp.asarray(out, dtype)

  weights = attention_weights(query, key, bias, float32_logits, dtype)
  if use_dropout:
    keep_prob = 1.0 - dropout_rate
    # Broadcast over queries (T5X's broadcast_dropout=True).
    dropout_shape = list(weights.shape)
    dropout_shape[-2] = 1
    keep = jax.random.bernoulli(dropout_rng, keep_prob, dropout_shape)
    keep = jnp.broadcast_to(keep, weights.shape)
    weights = weights * jnp.asarray(keep, dtype) / jnp.asarray(keep_prob, dtype)
  # [batch, heads, q, k] x [batch, k, heads, kv] -> [batch, q, heads, kv]
  return jnp.einsum('bhqk,bkhd->bqhd', weights, jnp.asarray(value, dtype))


class MultiHeadDotProductAttention(nn.Module):
  """T5X multi-head attention (`query`, `key`, `value`, `out`), plus prompt k/v.

  Attributes:
    num_heads, head_dim: H and K; projections are [embed, H*K] ('embed', 'joined_kv').
    attention_impl: see `dot_product_attention`.
    prefix_columns: leading key columns that are prompts without prompt_key
      (prompt tuning's prefix); with prompt_key, its l columns are the prompts.
      With the 'intermediates' collection mutable, the attention mass on the
      prompt columns is sown as `prompt_mass` [batch, heads, q], and with
      prompt_key the per-head key/value norms as `key_norms`/`value_norms`.
  """
  num_heads: int
  head_dim: int
  dtype: DType = jnp.float32
  dropout_rate: float = 0.
  kernel_init: Initializer = attention_kernel_init
  float32_logits: bool = False
  attention_impl: str = 'xla'
  prefix_columns: int = 0

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Array, mask: Optional[Array] = None,
               bias: Optional[Array] = None, *, prompt_key: Optional[Array] = None,
               prompt_value: Optional[Array] = None, decode: bool = False,
               deterministic: bool = False) -> Array:
    """inputs_q [batch, q, embed], inputs_kv [batch, k, embed] -> [batch, q, embed].

    mask [batch, 1, q, k] (1 = attend); bias [1|batch, heads, q, k];
    prompt_key/prompt_value [batch, l, heads, head_dim] prepended to keys/values.
    With decode=True (T5X protocol: a first call on full-length inputs creates
    the 'cache' collection, later calls take one position each) the cache holds
    the prompt keys/values in its first l columns, written at creation, and
    `cache_index` starts at l; later calls ignore the prompts' values. So the
    cache must come from that first call (not be zero-filled from shapes).
    """
    if (prompt_key is None) != (prompt_value is None):
      raise ValueError('prompt_key and prompt_value must be given together')
    projection = functools.partial(
        DenseGeneral, axis=-1, features=(self.num_heads, self.head_dim),
        kernel_axes=('embed', 'joined_kv'), dtype=self.dtype)
    depth_scaling = jnp.sqrt(self.head_dim).astype(jnp.float32)
    query_init = lambda *args: self.kernel_init(*args) / depth_scaling
    # [batch, length, embed] -> [batch, length, heads, kv]
    query = projection(kernel_init=query_init, name='query')(inputs_q)
    key = projection(kernel_init=self.kernel_init, name='key')(inputs_kv)
    value = projection(kernel_init=self.kernel_init, name='value')(inputs_kv)
    axes = ('batch', 'length', 'heads', 'kv')
    query = nn.with_logical_constraint(query, axes)
    key = nn.with_logical_constraint(key, axes)
    value = nn.with_logical_constraint(value, axes)

    prompt_len = 0 if prompt_key is None else prompt_key.shape[1]
    prompts_in_cache = False
    if decode:
      is_initialized = self.has_variable('cache', 'cached_key')
      # Cache layout [batch, l + max_length, heads, kv]: the prompt columns are
      # written once when the cache is created, and the index starts after them,
      # so a step never copies the cache to prepend the prompts.
      def initial(x, prompt):
        zeros = jnp.zeros(x.shape, x.dtype)
        if prompt is None:
          return zeros
        # [batch, l, heads, kv] ; [batch, max_len, heads, kv] -> [batch, l + max_len, heads, kv]
        return jnp.concatenate([jnp.asarray(prompt, x.dtype), zeros], axis=1)
      cached_key = self.variable('cache', 'cached_key', initial, key, prompt_key)
      cached_value = self.variable('cache', 'cached_value', initial, value, prompt_value)
      cache_index = self.variable('cache', 'cache_index',
                                  lambda: jnp.array(prompt_len, dtype=jnp.int32))
      if is_initialized:
        batch, length, _, _ = cached_key.value.shape
        if query.shape[1] != 1:
          raise ValueError(
              f'cached decoding takes one position per step, got length {query.shape[1]}')
        cur_index = cache_index.value
        # [batch, 1, heads, kv] written at position cur_index of the cache.
        key = lax.dynamic_update_slice(cached_key.value, key, (0, cur_index, 0, 0))
        value = lax.dynamic_update_slice(cached_value.value, value, (0, cur_index, 0, 0))
        cached_key.value = key
        cached_value.value = value
        cache_index.value = cur_index + 1
        # Only positions <= cur_index are filled (the prompt columns always are):
        # [batch, 1, 1, l + max_len].
        step_mask = jnp.broadcast_to(
            jnp.arange(length) <= cur_index, (batch, 1, 1, length))
        mask = combine_masks(mask, step_mask)
        if bias is not None:
          # [1, heads, max_len, max_len] -> [1, heads, 1, max_len] (this step's row)
          bias = lax.dynamic_slice_in_dim(bias, cur_index - prompt_len, 1, axis=-2)
          if prompt_len:
            # [1, heads, 1, max_len] -> [1, heads, 1, l + max_len]
            _, bias = _prepend_prompt_columns(None, bias, prompt_len)
        prompts_in_cache = True

    if prompt_key is not None and not prompts_in_cache:
      # [batch, l, heads, kv] ; [batch, k, heads, kv] -> [batch, l + k, heads, kv]
      key = jnp.concatenate([jnp.asarray(prompt_key, key.dtype), key], axis=1)
      value = jnp.concatenate([jnp.asarray(prompt_value, value.dtype), value], axis=1)
      mask, bias = _prepend_prompt_columns(mask, bias, prompt_len)

    bias_dtype = jnp.float32 if self.float32_logits else self.dtype
    attention_bias = _mask_to_bias(mask, bias, bias_dtype)
    num_prompt_columns = self.prefix_columns if prompt_key is None else prompt_key.shape[1]
    if num_prompt_columns and self.is_mutable_collection('intermediates'):
      # Only when asked for (analysis.py): the attention mass on the prompt
      # columns, [batch, heads, q, k] -> [batch, heads, q] (float32).
      weights = attention_weights(query, key, attention_bias, True, jnp.float32)
      self.sow('intermediates', 'prompt_mass',
               jnp.sum(weights[..., :num_prompt_columns], axis=-1))
      if prompt_key is not None:
        # prompt_scale.py: per-head norms [batch, l + k, heads] of prompt and real keys/values.
        for name, t in (('key_norms', key), ('value_norms', value)):
          self.sow('intermediates', name, jnp.linalg.norm(jnp.asarray(t, jnp.float32), axis=-1))
    dropout_rng = None
    if not deterministic and self.dropout_rate > 0.:
      dropout_rng = self.make_rng('dropout')
    x = dot_product_attention(
        query, key, value, bias=attention_bias, dropout_rng=dropout_rng,
        dropout_rate=self.dropout_rate, deterministic=deterministic, dtype=self.dtype,
        float32_logits=self.float32_logits, impl=self.attention_impl)
    x = nn.with_logical_constraint(x, ('batch', 'length', 'heads', 'kv'))
    # [batch, q, heads, kv] -> [batch, q, embed]
    return DenseGeneral(features=inputs_q.shape[-1], axis=(-2, -1),
                        kernel_init=self.kernel_init, kernel_axes=('joined_kv', 'embed'),
                        dtype=self.dtype, name='out')(x)
