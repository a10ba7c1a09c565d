"""T5 1.1 encoder-decoder (T5X `t5x/examples/t5` tree) with task conditioning.

The backbone parameters live under `token_embedder`, `encoder`, `decoder`
with T5X's exact names and shapes; every conditioning parameter lives under
the top-level `task_conditioning` (see `conditioning.py`, `hyperformer.py`), so the backbone is
the params tree minus that key.

Logical axes: parameters are declared T5X-style with
`flax.linen.partitioning.param_with_axes`, so `model.init` also returns a
`params_axes` collection; `param_logical_axes(config)` turns it into a tree of
`PartitionSpec`s of logical names matching `params` (T5X names plus
`tasks, prompt_len, hyper_blocks, hyper_bottleneck, task_embed, layer_task,
hyper_generated, hyper_layers, hyper_positions`). Activations are constrained
with `nn.with_logical_constraint` (a no-op without axis rules).

Packing (docs/PACKING.md): a packed batch adds seqio's `encoder_segment_ids`,
`encoder_positions` [batch, in_len] and `decoder_segment_ids`,
`decoder_positions` [batch, target_len] (segment ids 1.. per example in the
row, 0 = padding; positions 0-based within each segment). Each row holds the
examples of ONE task (`task_ids` stays [batch]), so the per-row prompts and
adapters are each example's own. Attention is block-diagonal by segment in
the encoder, the causal decoder and cross-attention; prompt key/value columns
are never masked (they belong to every segment of their row). Packed prompt
tuning: the data reserves `prompt_length` encoder positions (token id 0) at the
start of every segment, and the encoder replaces the embeddings at those
slots (segment id > 0, position < prompt_length) by prompt vector `position`
of the row's task; this is unpacked prompt tuning, whose prompt occupies
positions 0..l-1 before the inputs, and the packed encoder output keeps
length in_len. Without segment ids a batch is unpacked and computed as before.
"""
import dataclasses
import functools
from typing import Any, ClassVar, Dict, Optional, Sequence, Tuple

import flax
import flax.linen as nn
from flax.linen import partitioning as nn_partitioning
import jax
import jax.numpy as jnp
import numpy as np

from hyperprompt_t5x.model import conditioning as cond_lib
from hyperprompt_t5x.model import hyperformer
from hyperprompt_t5x.model import layers
from hyperprompt_t5x.model.methods import HYPERPROMPT_METHODS, METHODS

Array = jax.Array

# seqio's packing features, in the order of T5X's EncoderDecoder.__call__.
PACKING_FEATURES = ('encoder_segment_ids', 'decoder_segment_ids', 'encoder_positions',
                    'decoder_positions')
# The one top-level key of every task-conditioning parameter.
CONDITIONING_KEY = 'task_conditioning'
REMAT_POLICIES = ('none', 'full', 'dots', 'dots_with_no_batch_dims')
EMBEDDING_LOOKUPS = ('gather', 'one_hot')

# (emb, heads, enc layers, dec layers, head_dim, mlp) of the T5 1.1 sizes.
SIZE_FIELDS = {
    'tiny': dict(emb_dim=16, num_heads=2, num_encoder_layers=2, num_decoder_layers=2,
                 head_dim=6, mlp_dim=24, vocab_size=64),
    'small': dict(emb_dim=512, num_heads=6, num_encoder_layers=8, num_decoder_layers=8,
                  head_dim=64, mlp_dim=1024),
    'base': dict(emb_dim=768, num_heads=12, num_encoder_layers=12, num_decoder_layers=12,
                 head_dim=64, mlp_dim=2048),
    'large': dict(emb_dim=1024, num_heads=16, num_encoder_layers=24, num_decoder_layers=24,
                  head_dim=64, mlp_dim=2816),
    'xl': dict(emb_dim=2048, num_heads=32, num_encoder_layers=24, num_decoder_layers=24,
               head_dim=64, mlp_dim=5120),
    'xxl': dict(emb_dim=4096, num_heads=64, num_encoder_layers=24, num_decoder_layers=24,
                head_dim=64, mlp_dim=10240),
}
SIZES = tuple(SIZE_FIELDS)


@dataclasses.dataclass(frozen=True)
class T5Config:
  """T5X's T5Config plus the task-conditioning and performance fields.

  Conditioning defaults (the paper leaves them open): prompt_length l=16,
  bottleneck b=32, task_embed_dim t'=32, layer_task_dim t=32; prompts on
  every encoder and decoder self-attention, not on cross-attention; no
  biases in h, H, D, U; HyperFormer++ adapter_dim 64.
  `dropout_rate` drives embedding, residual and MLP dropout, and also the
  attention-weight dropout unless `attention_dropout_rate` is set (None, the
  default, means dropout_rate: T5X's behaviour).
  attention_impl 'dot_product_attention' / 'cudnn' (jax.nn.dot_product_attention)
  has no attention-weight dropout: while that dropout is active (training with
  an attention dropout > 0) attention falls back to 'xla'. Set
  attention_dropout_rate=0 to train with the fused attention while keeping
  dropout_rate (e.g. 0.1) everywhere else.
  """
  vocab_size: int = 32128
  dtype: Any = jnp.bfloat16
  emb_dim: int = 512
  num_heads: int = 8
  num_encoder_layers: int = 6
  num_decoder_layers: int = 6
  head_dim: int = 64
  mlp_dim: int = 2048
  mlp_activations: Sequence[str] = ('gelu', 'linear')
  dropout_rate: float = 0.1
  attention_dropout_rate: Optional[float] = None  # None: dropout_rate (as T5X)
  logits_via_embedding: bool = False
  float32_attention_logits: bool = True
  # Task conditioning.
  num_tasks: int = 1
  method: str = 'none'
  prompt_length: int = 16
  bottleneck: int = 32
  task_embed_dim: int = 32
  layer_task_dim: int = 32
  prompt_encoder: bool = True
  prompt_decoder: bool = True
  prompt_cross_attention: bool = False
  hyper_bias: bool = False
  adapter_dim: int = 64
  # Performance knobs.
  attention_impl: str = 'xla'
  remat_policy: str = 'none'
  embedding_lookup: str = 'gather'

  # Fields that change how the model runs, not its parameters: a run may resume with
  # them changed (model_config.json and the checkpoints' fingerprint leave them out).
  RUNTIME_FIELDS: ClassVar[Tuple[str, ...]] = (
      'dtype', 'dropout_rate', 'attention_dropout_rate', 'attention_impl', 'remat_policy',
      'embedding_lookup')

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f'T5Config.method={self.method!r} is unknown; expected one of {METHODS}')
    if isinstance(self.mlp_activations, list):
      object.__setattr__(self, 'mlp_activations', tuple(self.mlp_activations))
    positive = ['vocab_size', 'emb_dim', 'num_heads', 'num_encoder_layers',
                'num_decoder_layers', 'head_dim', 'mlp_dim', 'num_tasks']
    if self.method in HYPERPROMPT_METHODS or self.method == 'prompt_tuning':
      positive.append('prompt_length')
    if self.method in ('share', 'sep', 'global'):
      positive.append('bottleneck')
    if self.method in ('global', 'hyperformer'):
      positive += ['task_embed_dim', 'layer_task_dim']
    if self.method == 'hyperformer':
      positive.append('adapter_dim')
    for name in positive:
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f'T5Config.{name}={value!r} must be a positive integer '
                         f'(method={self.method!r})')
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f'T5Config.dropout_rate={self.dropout_rate!r} must be in [0, 1)')
    if self.attention_dropout_rate is not None and not 0.0 <= self.attention_dropout_rate < 1.0:
      raise ValueError(f'T5Config.attention_dropout_rate={self.attention_dropout_rate!r} must '
                       'be None (= dropout_rate) or in [0, 1)')
    if not self.mlp_activations:
      raise ValueError('T5Config.mlp_activations must name at least one activation')
    if (self.method in HYPERPROMPT_METHODS and not
        (self.prompt_encoder or self.prompt_decoder or self.prompt_cross_attention)):
      raise ValueError(f'T5Config(method={self.method!r}) prompts no attention block: set at '
                       'least one of prompt_encoder, prompt_decoder, prompt_cross_attention')
    for name, value, allowed in (('attention_impl', self.attention_impl, layers.ATTENTION_IMPLS),
                                 ('remat_policy', self.remat_policy, REMAT_POLICIES),
                                 ('embedding_lookup', self.embedding_lookup, EMBEDDING_LOOKUPS)):
      if value not in allowed:
        raise ValueError(f'T5Config.{name}={value!r}; expected one of {allowed}')

  @classmethod
  def from_size(cls, size: str, **overrides) -> 'T5Config':
    """T5 1.1 shapes: tiny (CPU tests, vocab 64), small, base, large, xl, xxl."""
    if size not in SIZE_FIELDS:
      raise ValueError(f'unknown T5 size {size!r}; expected one of {SIZES}')
    return cls(**{**SIZE_FIELDS[size], **overrides})

  def shape_fields(self) -> Dict[str, Any]:
    """The fields that shape the parameters (all but RUNTIME_FIELDS)."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
            if f.name not in self.RUNTIME_FIELDS}

  @property
  def attention_dropout(self) -> float:
    """The attention-weight dropout rate in effect."""
    return self.dropout_rate if self.attention_dropout_rate is None else self.attention_dropout_rate

  @property
  def conditioned(self) -> bool:
    return self.method != 'none'


def check_task_ids(task_ids, num_tasks: int) -> np.ndarray:
  """Host-side check: int ids of shape [batch] in [0, num_tasks); returns them as int32."""
  ids = np.asarray(task_ids)
  if ids.ndim != 1:
    raise ValueError(f'task_ids must have shape [batch], got shape {ids.shape}')
  if ids.size and not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f'task_ids must be integers, got dtype {ids.dtype}')
  bad = ids[(ids < 0) | (ids >= num_tasks)]
  if bad.size:
    raise ValueError(f'task_ids out of range [0, num_tasks={num_tasks}): '
                     f'bad ids {sorted(set(bad.tolist()))}')
  return ids.astype(np.int32)


def concrete_value(x) -> Optional[np.ndarray]:
  """x as a numpy array, or None when it is traced (inside jit/grad/vmap)."""
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def _remat(cls, policy_name: str, static_argnums):
  if policy_name == 'none':
    return cls
  policy = {
      'full': None,
      'dots': jax.checkpoint_policies.checkpoint_dots,
      'dots_with_no_batch_dims': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  }[policy_name]
  return nn.remat(cls, policy=policy, static_argnums=static_argnums, prevent_cse=True)


def _layer_adapters(adapters: Optional[Dict[str, Array]], layer: int):
  """[L, P, T, ...] -> [P, T, ...] for one layer (None when not HyperFormer++)."""
  if adapters is None:
    return None
  return {k: v[layer] for k, v in adapters.items()}


def _residual(cfg: T5Config, inputs, norm_name: str, sublayer, *, deterministic: bool,
              adapters=None, position: int = 0, task_ids=None):
  """T5 pre-norm sublayer: inputs + dropout(adapter(sublayer(norm(inputs)))).

  Called inside a compact layer, so the norm is that layer's `norm_name`
  child; the HyperFormer++ adapter (position 0 after attention, 1 after the
  MLP) is applied only when `adapters` are given.
  """
  x = layers.LayerNorm(dtype=cfg.dtype, name=norm_name)(inputs)
  x = nn.with_logical_constraint(x, ('batch', 'length', 'embed'))
  x = sublayer(x)
  if adapters is not None:
    x = hyperformer.apply_adapter(x, {k: v[position] for k, v in adapters.items()},
                                  task_ids, cfg.dtype)
  x = nn.Dropout(rate=cfg.dropout_rate, broadcast_dims=(-2,))(x, deterministic=deterministic)
  return nn.with_logical_constraint(x + inputs, ('batch', 'length', 'embed'))


def _attention(cfg: T5Config, name: str) -> layers.MultiHeadDotProductAttention:
  # Prompt tuning's prefix: the first l keys of encoder self- and cross-attention.
  prefix = cfg.prompt_length if cfg.method == 'prompt_tuning' and name != 'self_attention' else 0
  return layers.MultiHeadDotProductAttention(
      num_heads=cfg.num_heads, head_dim=cfg.head_dim, dtype=cfg.dtype,
      dropout_rate=cfg.attention_dropout, float32_logits=cfg.float32_attention_logits,
      attention_impl=cfg.attention_impl, prefix_columns=prefix, name=name)


def _mlp(cfg: T5Config, deterministic: bool):
  return lambda x: layers.MlpBlock(
      intermediate_dim=cfg.mlp_dim, activations=cfg.mlp_activations,
      intermediate_dropout_rate=cfg.dropout_rate, dtype=cfg.dtype,
      name='mlp')(x, deterministic=deterministic)


class EncoderLayer(nn.Module):
  """Pre-norm self-attention (+ prompts) and gated MLP with residuals."""
  config: T5Config

  @nn.compact
  def __call__(self, inputs, encoder_mask, encoder_bias, prompts, adapters, task_ids,
               deterministic: bool = False):
    cfg = self.config
    # [T, l, heads, kv] -> [batch, l, heads, kv]
    pk, pv = cond_lib.layer_prompts(prompts, task_ids, cfg.dtype)
    common = dict(deterministic=deterministic, adapters=adapters, task_ids=task_ids)
    x = _residual(cfg, inputs, 'pre_attention_layer_norm', lambda h: _attention(
        cfg, 'attention')(h, h, encoder_mask, encoder_bias, prompt_key=pk, prompt_value=pv,
                          deterministic=deterministic), position=0, **common)
    return _residual(cfg, x, 'pre_mlp_layer_norm', _mlp(cfg, deterministic), position=1,
                     **common)


class DecoderLayer(nn.Module):
  """Self-attention (+ prompts, cache), cross-attention (+ optional prompts), MLP."""
  config: T5Config

  @nn.compact
  def __call__(self, inputs, encoded, decoder_mask, encoder_decoder_mask, decoder_bias,
               self_prompts, cross_prompts, adapters, task_ids, deterministic: bool = False,
               decode: bool = False):
    cfg = self.config
    # [T, l, heads, kv] -> [batch, l, heads, kv]
    pk, pv = cond_lib.layer_prompts(self_prompts, task_ids, cfg.dtype)
    ck, cv = cond_lib.layer_prompts(cross_prompts, task_ids, cfg.dtype)
    common = dict(deterministic=deterministic, adapters=adapters, task_ids=task_ids)
    x = _residual(cfg, inputs, 'pre_self_attention_layer_norm', lambda h: _attention(
        cfg, 'self_attention')(h, h, decoder_mask, decoder_bias, prompt_key=pk,
                               prompt_value=pv, decode=decode, deterministic=deterministic),
                  position=0, **common)
    # No adapter after cross-attention (HyperFormer++ adapts self-attention and MLP).
    y = _residual(cfg, x, 'pre_cross_attention_layer_norm', lambda h: _attention(
        cfg, 'encoder_decoder_attention')(h, encoded, encoder_decoder_mask, None,
                                          prompt_key=ck, prompt_value=cv,
                                          deterministic=deterministic),
                  deterministic=deterministic)
    return _residual(cfg, y, 'pre_mlp_layer_norm', _mlp(cfg, deterministic), position=1,
                     **common)


def _relpos(cfg: T5Config) -> layers.RelativePositionBiases:
  return layers.RelativePositionBiases(num_buckets=32, max_distance=128,
                                       num_heads=cfg.num_heads, dtype=cfg.dtype,
                                       name='relpos_bias')


class Encoder(nn.Module):
  """Embed (+ prompt-tuning prefix) -> layers -> `encoder_norm`."""
  config: T5Config
  shared_embedding: nn.Module

  @nn.compact
  def __call__(self, encoder_input_tokens, encoder_mask=None, *, conditioning=None,
               task_ids=None, deterministic: bool = False, prompt_slots=None,
               encoder_positions=None):
    """prompt_slots [batch, length] bool (packed prompt tuning): the reserved
    positions whose embeddings become prompt vector `encoder_positions`."""
    cfg = self.config
    conditioning = conditioning or {}
    # [batch, length] -> [batch, length, embed]
    x = self.shared_embedding(encoder_input_tokens.astype('int32'))
    x = jnp.asarray(x, cfg.dtype)
    if 'encoder_prefix' in conditioning:
      prefix = jnp.asarray(conditioning['encoder_prefix'], cfg.dtype)
      if prompt_slots is None:
        # [batch, l, embed] ; [batch, length, embed] -> [batch, l + length, embed]
        x = jnp.concatenate([prefix, x], axis=1)
      else:
        # Packed: slot i of each segment takes prompt vector i of the row's task.
        index = jnp.clip(encoder_positions, 0, prefix.shape[1] - 1)
        # [batch, l, embed] gathered by [batch, length] -> [batch, length, embed]
        prompt = jnp.take_along_axis(prefix, index[..., None].astype(jnp.int32), axis=1)
        x = jnp.where(prompt_slots[..., None], prompt, x)
    x = nn.Dropout(rate=cfg.dropout_rate, broadcast_dims=(-2,))(x, deterministic=deterministic)
    length = x.shape[1]
    encoder_bias = _relpos(cfg)(length, length, True)
    prompts = conditioning.get('encoder')
    adapters = conditioning.get('adapters')
    layer_cls = _remat(EncoderLayer, cfg.remat_policy, static_argnums=(7,))
    for lyr in range(cfg.num_encoder_layers):
      layer_prompts = None if prompts is None else (prompts[0][lyr], prompts[1][lyr])
      x = layer_cls(cfg, name=f'layers_{lyr}')(
          x, encoder_mask, encoder_bias, layer_prompts, _layer_adapters(adapters, lyr),
          task_ids, deterministic)
    x = layers.LayerNorm(dtype=cfg.dtype, name='encoder_norm')(x)
    x = nn.Dropout(rate=cfg.dropout_rate, broadcast_dims=(-2,))(x, deterministic=deterministic)
    return nn.with_logical_constraint(x, ('batch', 'length', 'embed'))


class Decoder(nn.Module):
  """Embed -> layers -> `decoder_norm` -> `logits_dense` (or tied embedding)."""
  config: T5Config
  shared_embedding: nn.Module

  @nn.compact
  def __call__(self, encoded, decoder_input_tokens, decoder_mask=None,
               encoder_decoder_mask=None, *, conditioning=None, task_ids=None,
               deterministic: bool = False, decode: bool = False,
               max_decode_length: Optional[int] = None):
    cfg = self.config
    conditioning = conditioning or {}
    # [batch, length] -> [batch, length, embed]
    y = self.shared_embedding(decoder_input_tokens.astype('int32'))
    y = jnp.asarray(y, cfg.dtype)
    y = nn.Dropout(rate=cfg.dropout_rate, broadcast_dims=(-2,))(y, deterministic=deterministic)
    length = max_decode_length if decode and max_decode_length else y.shape[1]
    decoder_bias = _relpos(cfg)(length, length, False)
    self_prompts, cross_prompts = conditioning.get('decoder'), conditioning.get('cross')
    adapters = conditioning.get('adapters')
    if decode or cfg.remat_policy == 'none':
      layer_cls = DecoderLayer
    else:
      layer_cls = _remat(DecoderLayer, cfg.remat_policy, static_argnums=(10, 11))
    for lyr in range(cfg.num_decoder_layers):
      sp = None if self_prompts is None else (self_prompts[0][lyr], self_prompts[1][lyr])
      cp = None if cross_prompts is None else (cross_prompts[0][lyr], cross_prompts[1][lyr])
      y = layer_cls(cfg, name=f'layers_{lyr}')(
          y, encoded, decoder_mask, encoder_decoder_mask, decoder_bias, sp, cp,
          _layer_adapters(adapters, cfg.num_encoder_layers + lyr), task_ids,
          deterministic, decode)
    y = layers.LayerNorm(dtype=cfg.dtype, name='decoder_norm')(y)
    y = nn.Dropout(rate=cfg.dropout_rate, broadcast_dims=(-2,))(y, deterministic=deterministic)
    if cfg.logits_via_embedding:
      # Tied: [batch, length, embed] -> [batch, length, vocab], rescaled as T5X.
      logits = self.shared_embedding.attend(y) / jnp.sqrt(y.shape[-1])
    else:
      logits = layers.DenseGeneral(cfg.vocab_size, dtype=jnp.float32,
                                   kernel_axes=('embed', 'vocab'), name='logits_dense')(y)
    return nn.with_logical_constraint(logits, ('batch', 'length', 'vocab'))


class Transformer(nn.Module):
  """T5 1.1 encoder-decoder with task conditioning chosen by `config.method`.

  task_ids: int32 [batch]; None means all zeros, allowed only when
  num_tasks == 1 or method == 'none'. With method 'none' the ids are not used.
  Concrete (non-traced) ids are range-checked; under jit out-of-range ids
  make the gathered conditioning NaN instead of silently clamping.
  For 'prompt_tuning', `encode` returns [batch, l + in_len, emb] (the prompt
  positions stay visible to cross-attention) and `decode` extends the mask;
  packed, the prompts fill reserved slots and the length stays in_len.
  """
  config: T5Config

  def setup(self):
    cfg = self.config
    self.token_embedder = layers.Embed(
        num_embeddings=cfg.vocab_size, features=cfg.emb_dim, dtype=cfg.dtype,
        attend_dtype=jnp.float32, embedding_init=nn.initializers.normal(stddev=1.0),
        one_hot=cfg.embedding_lookup == 'one_hot')
    self.encoder = Encoder(cfg, shared_embedding=self.token_embedder)
    self.decoder = Decoder(cfg, shared_embedding=self.token_embedder)
    if cfg.method == 'hyperformer':
      self.task_conditioning = hyperformer.AdapterConditioning(cfg)
    elif cfg.conditioned:
      self.task_conditioning = cond_lib.TaskConditioning(cfg)

  def _task_ids(self, task_ids, batch: int):
    cfg = self.config
    if task_ids is None:
      if cfg.conditioned and cfg.num_tasks != 1:
        raise ValueError(f'task_ids is required: method={cfg.method!r} with '
                         f'num_tasks={cfg.num_tasks}')
      return jnp.zeros((batch,), jnp.int32)
    if cfg.conditioned:
      concrete = concrete_value(task_ids)
      if concrete is not None:
        check_task_ids(concrete, cfg.num_tasks)
    if jnp.shape(task_ids) != (batch,):
      raise ValueError(f'task_ids shape {jnp.shape(task_ids)} != [batch] = ({batch},)')
    return jnp.asarray(task_ids, jnp.int32)

  def compute_conditioning(self, task_ids, batch: int) -> Dict[str, Any]:
    """Prompts / adapter weights for this batch (empty for 'none'); reusable across steps."""
    task_ids = self._task_ids(task_ids, batch)
    if not self.config.conditioned:
      return {}
    return self.task_conditioning(task_ids)

  def _prompt_slots(self, encoder_input_tokens, encoder_segment_ids, encoder_positions):
    """bool [batch, in_len] of the reserved prompt positions (packed prompt tuning), else None.

    Concrete (non-traced) batches are checked: a slot must hold token 0.
    """
    l = self.config.prompt_length
    if encoder_segment_ids is None or self.config.method != 'prompt_tuning':
      return None
    if encoder_positions is None:
      raise ValueError('packed prompt tuning needs encoder_positions (the prompt slots are '
                       f'positions 0..{l - 1} of each segment)')
    slots = (encoder_segment_ids > 0) & (encoder_positions < l)
    held = concrete_value(jnp.where(slots, encoder_input_tokens, 0))
    if held is not None and held.any():
      rows = sorted(set(np.nonzero(held)[0].tolist()))
      raise ValueError(f'packed prompt tuning: rows {rows[:8]} have tokens at positions '
                       f'< prompt_length={l}; the data must reserve {l} slots (token 0) at '
                       'the start of every segment')
    return slots

  def _encoder_valid(self, encoder_input_tokens, prompt_slots=None):
    """[batch, in_len] -> bool [batch, (l +) in_len]: non-padding encoder positions."""
    valid = encoder_input_tokens > 0
    if prompt_slots is not None:
      return valid | prompt_slots
    if self.config.method == 'prompt_tuning':
      prefix = jnp.ones((valid.shape[0], self.config.prompt_length), bool)
      valid = jnp.concatenate([prefix, valid], axis=1)
    return valid

  def encode(self, encoder_input_tokens, task_ids=None, encoder_segment_ids=None,
             encoder_positions=None, *, enable_dropout: bool = True,
             conditioning: Optional[Dict[str, Any]] = None):
    """[batch, in_len] -> [batch, in_len (+ l for unpacked prompt_tuning), emb].

    encoder_segment_ids / encoder_positions [batch, in_len] (packed rows):
    attention stays within each segment (docs/PACKING.md).
    """
    cfg = self.config
    batch = encoder_input_tokens.shape[0]
    task_ids = self._task_ids(task_ids, batch)
    check_packing(encoder_input_tokens, encoder_segment_ids=encoder_segment_ids,
                  encoder_positions=encoder_positions)
    if conditioning is None:
      conditioning = self.compute_conditioning(task_ids, batch)
    slots = self._prompt_slots(encoder_input_tokens, encoder_segment_ids, encoder_positions)
    valid = self._encoder_valid(encoder_input_tokens, slots)
    encoder_mask = layers.combine_masks(
        layers.make_attention_mask(valid, valid, dtype=cfg.dtype),
        layers.make_segment_mask(encoder_segment_ids, encoder_segment_ids, dtype=cfg.dtype),
        dtype=cfg.dtype)
    return self.encoder(encoder_input_tokens, encoder_mask, conditioning=conditioning,
                        task_ids=task_ids, deterministic=not enable_dropout,
                        prompt_slots=slots, encoder_positions=encoder_positions)

  def decode(self, encoded, encoder_input_tokens, decoder_input_tokens,
             decoder_target_tokens, task_ids=None, encoder_segment_ids=None,
             decoder_segment_ids=None, encoder_positions=None, decoder_positions=None, *,
             enable_dropout: bool = True, decode: bool = False,
             max_decode_length: Optional[int] = None,
             conditioning: Optional[Dict[str, Any]] = None):
    """-> logits [batch, target_len, vocab]; decode=True steps the 'cache' collection.

    Packed rows (segment ids given) are for teacher forcing only, as in T5X.
    decoder_positions is accepted for T5X's interface; the decoder does not
    need it (its relative positions are index offsets within a segment).
    """
    del decoder_positions
    cfg = self.config
    batch = decoder_input_tokens.shape[0]
    task_ids = self._task_ids(task_ids, batch)
    if decode and encoder_segment_ids is not None:
      raise ValueError('packed rows (encoder_segment_ids) cannot be decoded step by step; '
                       'decode unpacked batches')
    check_packing(encoder_input_tokens, decoder_target_tokens, encoder_segment_ids,
                  decoder_segment_ids, encoder_positions)
    if conditioning is None:
      conditioning = self.compute_conditioning(task_ids, batch)
    encoder_valid = self._encoder_valid(
        encoder_input_tokens,
        self._prompt_slots(encoder_input_tokens, encoder_segment_ids, encoder_positions))
    if decode:
      decoder_mask = None
      encoder_decoder_mask = layers.make_attention_mask(
          jnp.ones_like(decoder_target_tokens, bool), encoder_valid, dtype=cfg.dtype)
    else:
      decoder_mask = layers.make_decoder_mask(decoder_target_tokens, cfg.dtype,
                                              decoder_segment_ids)
      encoder_decoder_mask = layers.combine_masks(
          layers.make_attention_mask(decoder_target_tokens > 0, encoder_valid, dtype=cfg.dtype),
          layers.make_segment_mask(decoder_segment_ids, encoder_segment_ids, dtype=cfg.dtype),
          dtype=cfg.dtype)
    return self.decoder(encoded, decoder_input_tokens, decoder_mask, encoder_decoder_mask,
                        conditioning=conditioning, task_ids=task_ids,
                        deterministic=not enable_dropout, decode=decode,
                        max_decode_length=max_decode_length)

  def __call__(self, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
               task_ids=None, encoder_segment_ids=None, decoder_segment_ids=None,
               encoder_positions=None, decoder_positions=None, *,
               enable_dropout: bool = True, decode: bool = False):
    """Teacher-forced logits [batch, target_len, vocab] (float32).

    The four packing features (T5X's names and order) are [batch, in_len] /
    [batch, target_len] int32, all None for unpacked batches.
    """
    batch = encoder_input_tokens.shape[0]
    task_ids = self._task_ids(task_ids, batch)
    conditioning = self.compute_conditioning(task_ids, batch)
    encoded = self.encode(encoder_input_tokens, task_ids, encoder_segment_ids,
                          encoder_positions, enable_dropout=enable_dropout,
                          conditioning=conditioning)
    return self.decode(encoded, encoder_input_tokens, decoder_input_tokens,
                       decoder_target_tokens, task_ids, encoder_segment_ids,
                       decoder_segment_ids, encoder_positions, decoder_positions,
                       enable_dropout=enable_dropout, decode=decode,
                       conditioning=conditioning)


def check_packing(encoder_input_tokens, decoder_target_tokens=None, encoder_segment_ids=None,
                  decoder_segment_ids=None, encoder_positions=None) -> None:
  """Static checks of the packing features: both segment ids or neither, token shapes."""
  if decoder_target_tokens is not None and (
      (encoder_segment_ids is None) != (decoder_segment_ids is None)):
    raise ValueError('packed batch: encoder_segment_ids and decoder_segment_ids must be given '
                     'together')
  for name, x, tokens in (('encoder_segment_ids', encoder_segment_ids, encoder_input_tokens),
                          ('encoder_positions', encoder_positions, encoder_input_tokens),
                          ('decoder_segment_ids', decoder_segment_ids, decoder_target_tokens)):
    if x is not None and jnp.shape(x) != jnp.shape(tokens):
      raise ValueError(f'{name} has shape {jnp.shape(x)}, its tokens {jnp.shape(tokens)}')


def _dummy_inputs(batch: int = 1, length: int = 4):
  tokens = jnp.ones((batch, length), jnp.int32)
  return tokens, tokens, tokens, jnp.zeros((batch,), jnp.int32)


def init_variables(config: T5Config, rng: jax.Array) -> Dict[str, Any]:
  """`{'params', 'params_axes'}` of a fresh model (shapes do not depend on lengths)."""
  model = Transformer(config)
  return model.init({'params': rng, 'dropout': rng}, *_dummy_inputs(), enable_dropout=False)


@functools.partial(jax.jit, static_argnums=0)
def _init_params_jit(config: T5Config, rng: jax.Array):
  return init_variables(config, rng)['params']


def init_params(config: T5Config, rng: jax.Array) -> Dict[str, Any]:
  """Freshly initialised float32 params (a plain nested dict); jitted, cached per config."""
  return flax.core.unfreeze(_init_params_jit(config, rng))


@functools.lru_cache(maxsize=64)
def _abstract_variables(config: T5Config):
  return flax.core.freeze(
      jax.eval_shape(lambda: init_variables(config, jax.random.PRNGKey(0))))


def param_shapes(config: T5Config) -> Dict[str, Any]:
  """ShapeDtypeStruct tree of the params, via jax.eval_shape (no allocation)."""
  return flax.core.unfreeze(_abstract_variables(config)['params'])


def param_logical_axes(config: T5Config) -> Dict[str, Any]:
  """Tree matching `params` whose leaves are PartitionSpecs of logical axis names."""
  axes = _abstract_variables(config)['params_axes']
  return flax.core.unfreeze(nn_partitioning.get_axis_names(axes))


def random_params(config: T5Config, seed: int = 0) -> Dict[str, Any]:
  """Host-side (numpy) random params with the init's shapes and scales, for tests/benchmarks.

  Compiling the real initialiser costs seconds of XLA CPU time even for a
  tiny model (one threefry per leaf); this skips it. Scales follow
  `init_params` (fan-in normal kernels, 1/sqrt(head_dim) on queries,
  N(0, 1) embeddings and prompts, generator scales of conditioning.py);
  biases are small non-zero normals so bias code paths are exercised.
  Not the training initialiser.
  """
  rng = np.random.default_rng(seed)
  cfg = config
  gen_fan = {'hyper_key_down': cfg.emb_dim, 'hyper_value_down': cfg.emb_dim,
             'hyper_key_up': cfg.bottleneck, 'hyper_value_up': cfg.bottleneck,
             'adapter_down': cfg.emb_dim, 'adapter_up': cfg.adapter_dim}
  gen_small = {'adapter_norm': 1e-2}

  def leaf(path, shape_dtype):
    names = [getattr(k, 'key', str(k)) for k in path]
    name, parent = names[-1], (names[-2] if len(names) > 1 else '')
    shape = shape_dtype.shape
    if name == 'scale':
      return np.ones(shape, np.float32)
    if name == 'bias':
      std = 0.1
    elif name in ('embedding', 'prompts', 'task_embedding', 'layer_embedding',
                  'position_embedding'):
      std = 1.0
    elif name == 'rel_embedding':
      std = 0.5
    elif parent in gen_fan:
      std = 1.0 / np.sqrt(shape[0] * gen_fan[parent])
      if parent in ('hyper_key_up', 'hyper_value_up'):
        std *= np.sqrt(2.0)  # He-scaled U (conditioning.py)
    elif parent in gen_small:
      std = gen_small[parent] / np.sqrt(shape[0])
    else:  # kernels [..., in, out]
      std = 1.0 / np.sqrt(shape[-2])
      if parent == 'query':
        std /= np.sqrt(cfg.head_dim)
      if name in ('key_up', 'value_up'):
        std *= np.sqrt(2.0)  # He-scaled U (conditioning.py)
    return (rng.standard_normal(shape) * std).astype(np.float32)

  host = jax.tree_util.tree_map_with_path(leaf, flax.core.unfreeze(param_shapes(config)))
  return jax.tree_util.tree_map(jnp.asarray, host)
