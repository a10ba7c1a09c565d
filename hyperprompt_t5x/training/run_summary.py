"""The few lines a training run prints before it compiles: what is about to train.

Method, model size, parameters (total / added by task conditioning / trainable),
mixture and its task ids, batch and feature lengths, devices and mesh, MODEL_DIR
and the TensorBoard command. Everything comes from the run's plan (abstract
shapes), so it prints before any parameter is initialised or restored.
"""
from __future__ import annotations

import textwrap
from typing import Mapping, Optional, Sequence

import jax
import numpy as np
from hyperprompt_t5x import optim
from hyperprompt_t5x.model import network
from hyperprompt_t5x.model.network import CONDITIONING_KEY

from hyperprompt_t5x.training import train_data

METHOD_TITLES = {'global': 'HyperPrompt-Global', 'share': 'HyperPrompt-Share',
                 'sep': 'HyperPrompt-Sep', 'prompt_tuning': 'multi-task prompt tuning',
                 'hyperformer': 'HyperFormer++', 'none': 'plain multi-task T5 (MTL)'}
_WIDTH = 80
_KEY = 12  # width of the label column


def model_size(config) -> str:
  """'T5 1.1 base' when the backbone has a T5 1.1 size's shape, else its shape."""
  shape = ('emb_dim', 'num_heads', 'num_encoder_layers', 'num_decoder_layers', 'head_dim',
           'mlp_dim')
  for name, fields in network.SIZE_FIELDS.items():
    if all(getattr(config, k) == fields[k] for k in shape):
      return f'T5 1.1 {name}'
  return (f'custom T5 1.1 shape: emb {config.emb_dim}, {config.num_encoder_layers}+'
          f'{config.num_decoder_layers} layers, {config.num_heads} heads x '
          f'{config.head_dim}, mlp {config.mlp_dim}')


def parameter_counts(abstract_params, freeze: str) -> dict:
  """total / added (under `task_conditioning`) / trainable, from shapes only."""

  def size(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))

  mask = optim.trainable_mask(abstract_params, freeze)
  sizes = jax.tree_util.tree_map(lambda x: int(np.prod(x.shape)), abstract_params)
  trainable = sum(s for s, m in zip(jax.tree_util.tree_leaves(sizes),
                                    jax.tree_util.tree_leaves(mask)) if m)
  return {'total': size(abstract_params),
          'added': size(abstract_params.get(CONDITIONING_KEY, {})),
          'trainable': int(trainable)}


def _line(key: str, value: str) -> str:
  return textwrap.fill(value, _WIDTH, initial_indent=f'{key:<{_KEY}}',
                       subsequent_indent=' ' * _KEY, break_on_hyphens=False)


def _batch_line(batch_size: int, lengths: Mapping[str, int], pack: bool) -> str:
  if not pack:
    return (f'{batch_size} examples of {lengths["inputs"]} input + {lengths["targets"]} '
            'target tokens (rows not packed)')
  rows = train_data.row_lengths(lengths, pack)
  return (f'{batch_size} packed rows of {rows["inputs"]} input + {rows["targets"]} target '
          'tokens, each several examples of one task (PACK)')


def describe(plan, config, *, freeze: str, mixture: str, task_names: Sequence[str],
             batch_size: int, lengths: Mapping[str, int], train_steps: int,
             start_step: Optional[int], model_dir: str, pack: bool = False) -> str:
  """The summary block (lines of at most 80 columns)."""
  counts = parameter_counts(plan.abstract_state.params, freeze)
  share = 100.0 * counts['added'] / max(counts['total'] - counts['added'], 1)
  devices = jax.devices()
  kinds = sorted({d.device_kind for d in devices})
  mesh = ' x '.join(f'{name} {size}' for name, size in plan.mesh.shape.items())
  start = ('from step 0' if start_step is None
           else f'resuming at checkpoint_{start_step}')
  lines = [
      _line('method', f'{config.method} ({METHOD_TITLES.get(config.method, "")})'),
      _line('model', model_size(config) + f', vocab {config.vocab_size}'),
      _line('parameters', f'{counts["total"]:,} total, {counts["added"]:,} added by task '
            f'conditioning (+{share:.2f} %), {counts["trainable"]:,} trainable '
            f'(FREEZE={freeze})'),
      _line('mixture', f'{mixture}: ' + ', '.join(
          f'{i} {name}' for i, name in enumerate(task_names))),
      _line('batch', _batch_line(batch_size, lengths, pack) + f'; {train_steps} steps, {start}'),
      _line('devices', f'{len(devices)} x {", ".join(kinds)} ({jax.process_count()} '
            f'process{"es" if jax.process_count() > 1 else ""}); mesh {mesh}'),
      # Never wrapped: a path and a command are copied as they are.
      f'{"MODEL_DIR":<{_KEY}}{model_dir}',
      f'{"TensorBoard":<{_KEY}}tensorboard --logdir {model_dir}',
  ]
  return '\n'.join(lines)
