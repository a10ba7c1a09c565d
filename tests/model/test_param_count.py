"""Parameter counts of the (abstract) init agree with docs/METHODS.md's closed forms.

The counts of a real, materialised init are checked against the same closed
forms in test_conditioning.py's prompt-norm test (it already pays for a
real init of each HyperPrompt variant).
"""
import time

import pytest

from hyperprompt_t5x.model import network
from hyperprompt_t5x.model import param_count

# emb 16 != heads*head_dim 12 (like T5 1.1 small); 3 encoder / 2 decoder layers.
SMALLISH = dict(vocab_size=64, emb_dim=16, num_heads=2, head_dim=6, mlp_dim=24,
                num_encoder_layers=3, num_decoder_layers=2, num_tasks=5, prompt_length=4,
                bottleneck=3, task_embed_dim=7, layer_task_dim=6, adapter_dim=5)
FLAG_COMBOS = [
    {},                                                       # encoder + decoder (default)
    dict(prompt_decoder=False),                               # encoder only
    dict(prompt_encoder=False),                               # decoder only
    dict(prompt_cross_attention=True),                        # + cross-attention
    dict(prompt_encoder=False, prompt_decoder=False, prompt_cross_attention=True),
    dict(hyper_bias=True),
    dict(hyper_bias=True, prompt_cross_attention=True, prompt_encoder=False),
    dict(emb_dim=12, prompt_length=1, num_tasks=1),           # d == d_kv
]


def _design_form(cfg):
  """docs/METHODS.md's closed forms verbatim (no biases, d_kv == d)."""
  big_t, l, d, b = cfg.num_tasks, cfg.prompt_length, cfg.emb_dim, cfg.bottleneck
  m = (cfg.num_encoder_layers * cfg.prompt_encoder + cfg.num_decoder_layers *
       (cfg.prompt_decoder + cfg.prompt_cross_attention))
  te, t = cfg.task_embed_dim, cfg.layer_task_dim
  h = 2 * te * t + t * t  # h: 2t' -> t -> t, no biases
  return {'share': big_t * l * d + m * 4 * d * b,
          'sep': big_t * l * d + big_t * m * 4 * d * b,
          'global': big_t * l * d + big_t * te + m * te + h + 2 * (2 * d * b * t)}[cfg.method]


def _backbone(cfg):
  """T5X backbone size from docs/METHODS.md, Parameter tree's table."""
  d, hk, f, v = cfg.emb_dim, cfg.num_heads * cfg.head_dim, cfg.mlp_dim, cfg.vocab_size
  attn, mlp = 4 * d * hk, 3 * d * f
  enc = cfg.num_encoder_layers * (2 * d + attn + mlp)
  dec = cfg.num_decoder_layers * (3 * d + 2 * attn + mlp)
  return 2 * v * d + 2 * cfg.num_heads * 32 + enc + dec + 2 * d


@pytest.mark.parametrize('flags', FLAG_COMBOS)
@pytest.mark.parametrize('method', ['share', 'sep', 'global'])
def test_hyperprompt_counts_equal_closed_forms(method, flags):
  cfg = network.T5Config(method=method, **{**SMALLISH, **flags})
  counts = param_count.count_params(cfg)
  assert counts['added'] == param_count.closed_form_added(cfg)
  assert counts['matches_closed_form']
  assert counts['backbone'] == _backbone(cfg)
  assert counts['total'] == counts['backbone'] + counts['added']
  if not cfg.hyper_bias and cfg.emb_dim == cfg.num_heads * cfg.head_dim:
    assert counts['added'] == _design_form(cfg)


@pytest.mark.parametrize('method', ['none', 'prompt_tuning', 'hyperformer'])
def test_baseline_counts_equal_closed_forms(method):
  cfg = network.T5Config(method=method, **SMALLISH)
  counts = param_count.count_params(cfg)
  assert counts['added'] == param_count.closed_form_added(cfg)
  assert counts['backbone'] == _backbone(cfg)
  if method == 'prompt_tuning':
    assert counts['added'] == counts['prompt_params'] == 5 * 4 * 16


def test_count_params_report_and_xxl_is_quick():
  cfg = network.T5Config.from_size('xxl', method='global', num_tasks=8)
  start = time.perf_counter()
  counts = param_count.count_params(cfg)
  assert time.perf_counter() - start < 60
  for key in ('total', 'backbone', 'added', 'added_fraction', 'method', 'num_tasks',
              'prompt_length', 'bottleneck', 'task_embed_dim', 'layer_task_dim'):
    assert key in counts, key
  assert counts['backbone'] == _backbone(cfg)
  assert counts['added'] == _design_form(cfg) == param_count.closed_form_added(cfg)
  assert counts['added_fraction'] == counts['added'] / counts['backbone']
  assert counts['method'] == 'global' and counts['num_tasks'] == 8
