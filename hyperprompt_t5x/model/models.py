"""The encoder-decoder model wrapper: loss, scoring and prediction (T5X-style).

`EncoderDecoderModel` binds a `network.Transformer` to what the trainer
needs: initialisation (concrete, or abstract for shardings), T5X's
cross-entropy with z-loss and label smoothing, per-example log-likelihood
scores, and greedy cached decoding. Imports only JAX and Flax.

Batch features (docs/ARCHITECTURE.md): `encoder_input_tokens`,
`decoder_input_tokens`, `decoder_target_tokens` [batch, len] int32,
`decoder_loss_weights` [batch, targets_len], `task_ids` [batch] int32; a
packed batch adds `network.PACKING_FEATURES` (docs/PACKING.md), passed to the
network as they are; the loss is then the same weighted token mean, and
`sum_per_segment` gives per-example sums.
"""
from __future__ import annotations

from typing import Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import core as flax_core
from flax import traverse_util
from flax.linen import partitioning as nn_partitioning

from hyperprompt_t5x.model import network
from hyperprompt_t5x.model import decoding

Array = jax.Array
Batch = Mapping[str, Array]


def cross_entropy_with_z_loss(logits: Array, targets: Array, z_loss: float = 0.0,
                              label_smoothing: float = 0.0) -> Tuple[Array, Array]:
  """Per-token T5X cross-entropy with z-loss and label smoothing.

  Soft targets put 1 - label_smoothing on the target and label_smoothing /
  (V - 1) on every other token; T5X's normalising constant (the soft
  targets' entropy) is subtracted so a perfect model scores 0. The z-loss
  z_loss * log(Z)^2 keeps the softmax normaliser near 1.
  Computed without a [.., V] one-hot: sum_v q_v log p_v =
  low * sum_v log p_v + (conf - low) * log p_target.

  Args:
    logits: [batch, length, vocab], any float dtype (upcast to float32).
    targets: [batch, length] int token ids.
  Returns:
    (total_loss, z_loss) per token, each [batch, length] float32; total
    includes the z-loss.
  """
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f'label_smoothing must be in [0, 1), got {label_smoothing}')
  logits = logits.astype(jnp.float32)
  vocab = logits.shape[-1]
  confidence = 1.0 - label_smoothing
  low = label_smoothing / (vocab - 1)
  normalizing_constant = -(confidence * np.log(confidence)
                           + (vocab - 1) * low * np.log(low + 1e-20))
  # [batch, length, vocab] -> [batch, length]
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32),
                                     axis=-1)[..., 0]
  soft_log_prob = (confidence - low) * (target_logit - log_z)
  if label_smoothing:
    soft_log_prob = soft_log_prob + low * (jnp.sum(logits, axis=-1) - vocab * log_z)
  z = z_loss * jnp.square(log_z)
  total = -soft_log_prob + z - normalizing_constant
  return total, z


def packing_features(batch: Batch) -> dict:
  """The packing features present in `batch` ({} for an unpacked batch)."""
  return {k: batch[k] for k in network.PACKING_FEATURES if k in batch}


def sum_per_segment(values: Array, segment_ids: Array, num_segments: int) -> Array:
  """Per-example sums of token values in packed rows: [batch, len] -> [batch, num_segments].

  Column s - 1 holds segment s's sum (0 where a row has fewer segments);
  padding (segment id 0) and ids above num_segments are dropped.
  """
  # [batch, len] -> [batch, len, num_segments] one-hot of segment ids 1..num_segments
  one_hot = jax.nn.one_hot(segment_ids - 1, num_segments, dtype=values.dtype)
  return jnp.einsum('bl,bls->bs', values, one_hot)


class EncoderDecoderModel:
  """A `network.Transformer` with T5X's loss, scoring and greedy prediction."""

  def __init__(self, config: network.T5Config, *, z_loss: float = 1e-4,
               label_smoothing: float = 0.0,
               loss_normalizing_factor: Optional[float] = None):
    if not 0.0 <= label_smoothing < 1.0:
      raise ValueError(f'label_smoothing must be in [0, 1), got {label_smoothing}')
    if loss_normalizing_factor is not None and loss_normalizing_factor <= 0:
      raise ValueError(f'loss_normalizing_factor must be > 0, got {loss_normalizing_factor}')
    self.config = config
    self.module = network.Transformer(config)
    self.z_loss = float(z_loss)
    self.label_smoothing = float(label_smoothing)
    self.loss_normalizing_factor = loss_normalizing_factor
    self._abstract_cache = {}

  # -- initialisation --------------------------------------------------------

  def _dummy_inputs(self, batch_size: int, input_len: int, target_len: int):
    enc = jnp.ones((batch_size, input_len), jnp.int32)
    dec = jnp.ones((batch_size, target_len), jnp.int32)
    task_ids = jnp.zeros((batch_size,), jnp.int32)
    return enc, dec, dec, task_ids

  def _init_variables(self, rng: Array, batch_size: int, input_len: int, target_len: int):
    enc, dec_in, dec_tgt, task_ids = self._dummy_inputs(batch_size, input_len, target_len)
    params_rng, dropout_rng = jax.random.split(rng)
    return self.module.init({'params': params_rng, 'dropout': dropout_rng}, enc, dec_in,
                            dec_tgt, task_ids, enable_dropout=False)

  def init_abstract(self, batch_size: int, input_len: int, target_len: int):
    """`jax.eval_shape` of init: {'params': ShapeDtypeStructs, 'params_axes': ...}.

    Memoised per shape: tracing the network costs seconds and the trainer,
    the optimizer and the shardings all ask for it.
    """
    key = (batch_size, input_len, target_len)
    if key not in self._abstract_cache:
      self._abstract_cache[key] = jax.eval_shape(
          lambda rng: self._init_variables(rng, batch_size, input_len, target_len),
          jax.random.PRNGKey(0))
    return self._abstract_cache[key]

  def init(self, rng: Array, input_len: int, target_len: int):
    """Fresh float32 parameters, a plain nested dict (no axis metadata)."""
    return self._init_variables(rng, 1, input_len, target_len)['params']

  def logical_axes(self, input_len: int, target_len: int):
    """PartitionSpecs of logical axis names, one per parameter (T5X `params_axes`)."""
    variables = self.init_abstract(1, input_len, target_len)
    params = variables['params']
    axes = variables.get('params_axes')
    if axes is None:
      raise ValueError('the network declared no parameter axes (params_axes collection)')
    named = traverse_util.flatten_dict(
        flax_core.unfreeze(nn_partitioning.get_axis_names(axes)))
    # Parameters declared without axes (none in network.py) are replicated.
    flat = traverse_util.flatten_dict(flax_core.unfreeze(params))
    return traverse_util.unflatten_dict(
        {path: named.get(path, jax.sharding.PartitionSpec()) for path in flat})

  # -- forward ---------------------------------------------------------------

  def _logits(self, params, batch: Batch, dropout_rng: Optional[Array]) -> Array:
    rngs = {'dropout': dropout_rng} if dropout_rng is not None else None
    # -> [batch, targets_len, vocab]
    return self.module.apply(
        {'params': params}, batch['encoder_input_tokens'], batch['decoder_input_tokens'],
        batch['decoder_target_tokens'], batch.get('task_ids'), **packing_features(batch),
        enable_dropout=dropout_rng is not None, rngs=rngs)

  @staticmethod
  def _weights(batch: Batch) -> Array:
    weights = batch.get('decoder_loss_weights')
    if weights is None:
      weights = batch['decoder_target_tokens'] > 0
    return jnp.asarray(weights, jnp.float32)

  def loss_fn(self, params, batch: Batch, dropout_rng: Optional[Array]):
    """Weighted mean token loss (dropout on iff dropout_rng is given).

    Returns (loss, metrics) with metrics: loss, z_loss, cross_ent_loss
    (all normalised like the loss), accuracy (weighted), num_tokens.
    """
    logits = self._logits(params, batch, dropout_rng)
    targets = batch['decoder_target_tokens']
    weights = self._weights(batch)
    total, z = cross_entropy_with_z_loss(logits, targets, self.z_loss, self.label_smoothing)
    num_tokens = jnp.sum(weights)
    if self.loss_normalizing_factor is not None:
      normalizer = jnp.float32(self.loss_normalizing_factor)
    else:
      normalizer = jnp.maximum(num_tokens, 1.0)
    loss = jnp.sum(total * weights) / normalizer
    z_loss = jnp.sum(z * weights) / normalizer
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    metrics = {
        'loss': loss,
        'z_loss': z_loss,
        'cross_ent_loss': loss - z_loss,
        'accuracy': jnp.sum(correct * weights) / jnp.maximum(num_tokens, 1.0),
        'num_tokens': num_tokens,
    }
    return loss, metrics

  def token_scores(self, params, batch: Batch) -> Array:
    """Weighted log p(target) per target token: [batch, len] float32."""
    logits = self._logits(params, batch, None).astype(jnp.float32)
    # [batch, len, vocab] -> [batch, len]
    log_p = jax.nn.log_softmax(logits, axis=-1)
    token_ll = jnp.take_along_axis(
        log_p, batch['decoder_target_tokens'][..., None].astype(jnp.int32), axis=-1)[..., 0]
    return token_ll * self._weights(batch)

  def score_batch(self, params, batch: Batch) -> Array:
    """Sum over target tokens of log p(target), weighted: [batch] float32.

    Per row: for a packed batch, `sum_per_segment(token_scores(...),
    batch['decoder_segment_ids'], n)` gives each example's score.
    """
    return jnp.sum(self.token_scores(params, batch), axis=-1)

  def predict_batch(self, params, batch: Batch,
                    max_decode_length: Optional[int] = None) -> Array:
    """Greedy cached decoding: int32 [batch, max_decode_length] (EOS = 1, then 0s)."""
    if packing_features(batch):
      raise ValueError(f'predict_batch: the batch is packed ({sorted(packing_features(batch))}); '
                       'decoding takes unpacked batches')
    if max_decode_length is None:
      if 'decoder_target_tokens' not in batch:
        raise ValueError('predict_batch needs max_decode_length or decoder_target_tokens '
                         'in the batch to size the output')
      max_decode_length = batch['decoder_target_tokens'].shape[1]
    return decoding.greedy_decode(self.config, params, batch['encoder_input_tokens'],
                                  batch.get('task_ids'), max_decode_length, eos_id=1)

