"""`hyperprompt-t5x analyze`: attention mass on the prompt columns, per layer (the paper's analysis).

For each task of the mixture, N validation examples (default 100) run
teacher-forced through the restored model with the attention layers sowing
`prompt_mass` (layers.py: the softmax weight a query puts on the prompt key
columns, summed over those columns). Per layer it is averaged over the real
(non-padding) query positions of each example, then over heads and examples:

    mass[task][kind][layer] = mean_{examples, heads} mean_{real queries q} Σ_{j<l} A[h, q, j]

kinds: `encoder` / `decoder` self-attention and `cross` (cross-attention)
where the method puts prompts there. The spread over heads is reported as
each head's mean (`per_head`) and their standard deviation (`head_std`).

What applies per method: HyperPrompt share/sep/global: the prompted blocks
(prompt_encoder, prompt_decoder, prompt_cross_attention). prompt_tuning: the
prompts are the first l encoder positions, so encoder self-attention and
cross-attention (which reads them in the encoder output) have prompt
columns; decoder self-attention has none. none and hyperformer have no
prompts: analyze stops with that message.

Output: MODEL_DIR/analysis/attention_mass.json
  {task: {"encoder": [per layer], "decoder": [...], ("cross": [...]),
          "per_head": {kind: [[per head] per layer]}, "head_std": {kind: [...]},
          "num_examples": n, "note": what applies}}
and attention_mass.png beside it (layers on x, mass on y, one line per task,
one panel per kind).
"""
import json
import os
from typing import Any, Dict, List, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from hyperprompt_t5x.model.methods import HYPERPROMPT_METHODS
from hyperprompt_t5x.model import network
from hyperprompt_t5x.evaluation import evaluator
from hyperprompt_t5x.run.metrics_logging import log

KINDS = {'encoder': ('encoder', 'attention'), 'decoder': ('decoder', 'self_attention'),
         'cross': ('decoder', 'encoder_decoder_attention')}


def prompted_kinds(config: network.T5Config) -> List[str]:
  """The attention kinds with prompt columns under `config`'s method."""
  if config.method in HYPERPROMPT_METHODS:
    return [k for k, flag in (('encoder', config.prompt_encoder),
                              ('decoder', config.prompt_decoder),
                              ('cross', config.prompt_cross_attention)) if flag]
  if config.method == 'prompt_tuning':
    return ['encoder', 'cross']
  return []


def method_note(config: network.T5Config) -> str:
  """One sentence: what the analysis measures for this method."""
  if config.method == 'prompt_tuning':
    return ('prompt_tuning: the prompts are the first l encoder positions; encoder '
            'self-attention and cross-attention have prompt columns, decoder '
            'self-attention has none')
  kinds = prompted_kinds(config)
  return f'{config.method}: hyper-prompts in {", ".join(kinds)} attention'


def _check_method(config: network.T5Config) -> None:
  if not prompted_kinds(config):
    raise ValueError(f'analyze: method {config.method!r} puts no prompts in any attention '
                     'layer, so attention mass on prompts does not apply (it applies to '
                     'share, sep, global and prompt_tuning)')


def prompt_mass(config: network.T5Config, params, batch: Mapping[str, Any]) -> Dict[str, Any]:
  """Per example, layer and head: mean over real queries of the mass on prompt columns.

  Returns {kind: [batch, layers, heads]} (float32) for the prompted kinds.
  """
  _check_method(config)
  model = network.Transformer(config)
  enc, tgt = batch['encoder_input_tokens'], batch['decoder_target_tokens']
  _, state = model.apply({'params': params}, enc, batch['decoder_input_tokens'], tgt,
                         batch.get('task_ids'), enable_dropout=False,
                         mutable=['intermediates'])
  inter = state['intermediates']
  enc_valid = enc > 0
  if config.method == 'prompt_tuning':
    # The prefix positions are queries too; the mass is measured on real tokens.
    enc_valid = jnp.concatenate(
        [jnp.zeros((enc.shape[0], config.prompt_length), bool), enc_valid], axis=1)
  query_valid = {'encoder': enc_valid, 'decoder': tgt > 0, 'cross': tgt > 0}
  num_layers = {'encoder': config.num_encoder_layers, 'decoder': config.num_decoder_layers,
                'cross': config.num_decoder_layers}
  out = {}
  for kind in prompted_kinds(config):
    stack, module = KINDS[kind]
    valid = query_valid[kind].astype(jnp.float32)  # [batch, q]
    per_layer = []
    for lyr in range(num_layers[kind]):
      (mass,) = inter[stack][f'layers_{lyr}'][module]['prompt_mass']  # [batch, heads, q]
      # [batch, heads, q] -> [batch, heads]: mean over the real queries
      per_layer.append(jnp.sum(mass * valid[:, None], -1) /
                       jnp.maximum(jnp.sum(valid, -1), 1.0)[:, None])
    out[kind] = jnp.stack(per_layer, axis=1)  # [batch, layers, heads]
  return out


def summarize(per_example: Mapping[str, np.ndarray], note: str) -> Dict[str, Any]:
  """{kind: [batch, layers, heads]} -> the JSON entry of one task."""
  entry: Dict[str, Any] = {'per_head': {}, 'head_std': {}}
  n = 0
  for kind, values in per_example.items():
    values = np.asarray(values, np.float64)
    n = values.shape[0]
    per_head = values.mean(axis=0)  # [layers, heads]
    entry[kind] = [float(x) for x in per_head.mean(axis=1)]
    entry['per_head'][kind] = per_head.tolist()
    entry['head_std'][kind] = [float(x) for x in per_head.std(axis=1)]
  if 'decoder' not in entry:
    entry['decoder'] = []  # prompt tuning: no prompt columns in decoder self-attention
  entry['num_examples'] = n
  entry['note'] = note
  return entry


def plot(results: Mapping[str, Mapping[str, Any]], path: str) -> None:
  """The paper's figure style: layers on x, mass on y, one line per task, a panel per kind."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  kinds = [k for k in KINDS if any(r.get(k) for r in results.values())]
  fig, axes = plt.subplots(1, len(kinds), figsize=(4.5 * len(kinds), 3.6), squeeze=False)
  for ax, kind in zip(axes[0], kinds):
    for task, r in results.items():
      if r.get(kind):
        ax.plot(range(1, len(r[kind]) + 1), r[kind], marker='o', label=task)
    ax.set_title({'encoder': 'encoder self-attention', 'decoder': 'decoder self-attention',
                  'cross': 'cross-attention'}[kind])
    ax.set_xticks(range(1, 1 + max(len(r.get(kind) or []) for r in results.values())))
    ax.set_xlabel('layer')
    ax.set_ylabel('attention mass on prompts')
    ax.set_ylim(0, 1)
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def analyze(*, model_dir: str, model_config, mixture_or_task_name: str,
            task_feature_lengths: Mapping[str, int], checkpoint_path: Optional[str] = None,
            split: str = 'validation', batch_size: int = 32,
            max_examples: Optional[int] = None, num_partitions: int = 1,
            optimizer: str = 'adafactor', freeze: str = 'all',
            num_examples: int = 100) -> Dict[str, Any]:
  """Writes MODEL_DIR/analysis/attention_mass.{json,png} for one checkpoint (eval's flags).

  num_examples per task (default 100, the paper's); max_examples, when set
  and smaller, caps it as for eval. `optimizer` and `freeze`: not used, as for eval.
  """
  del optimizer, freeze
  _check_method(model_config)
  if max_examples is not None:
    num_examples = min(num_examples, max_examples)
  run, validation, model_dir = evaluator.restored_evaluator(
      model_dir, model_config, mixture_or_task_name, task_feature_lengths,
      checkpoint_path, num_partitions, split=split,
      batch_size=batch_size, max_examples=num_examples)
  params = jax.device_get(run.params)
  mass_fn = jax.jit(lambda p, b: prompt_mass(model_config, p, b))
  note = method_note(model_config)
  results = {}
  for eval_set in validation.sets:
    parts: Dict[str, List[np.ndarray]] = {}
    for batch in eval_set.batches:
      for kind, v in mass_fn(params, batch).items():
        parts.setdefault(kind, []).append(np.asarray(v))
    results[eval_set.name] = summarize(
        {k: np.concatenate(v) for k, v in parts.items()}, note)
  out_dir = os.path.join(model_dir, 'analysis')
  if jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, 'attention_mass.json')
    with open(path + '.tmp', 'w') as f:
      json.dump(results, f, indent=1)
    os.replace(path + '.tmp', path)
    plot(results, os.path.join(out_dir, 'attention_mass.png'))
    log(f'attention mass on the prompt columns at step {run.start_step} (mean over '
        f'heads and {num_examples} examples per task); {note}')
    print(format_mass_table(results, prompted_kinds(model_config)), flush=True)
    log(f'written {path} and attention_mass.png (step {run.start_step})')
  return results


def format_mass_table(results: Mapping[str, Mapping[str, Any]], kinds: List[str]) -> str:
  """One row per task and attention kind, one column per layer, under a header."""
  from hyperprompt_t5x.evaluation import evaluator  # pylint: disable=g-import-not-at-top
  prefix, shown = evaluator.short_task_names(results)
  layers = max([len(r.get(k) or []) for r in results.values() for k in kinds] + [0])
  name_w = max([len('task')] + [len(n) for n in shown.values()])
  kind_w = max(len('attention'), *(len(k) for k in kinds))
  lines = [f'tasks {prefix}*'] if prefix else []
  lines.append(f'{"task":<{name_w}}  {"attention":<{kind_w}}'
               + ''.join(f'  {f"layer {i}":>7}' for i in range(1, layers + 1)))
  for task, r in results.items():
    for kind in kinds:
      lines.append(f'{shown[task]:<{name_w}}  {kind:<{kind_w}}'
                   + ''.join(f'  {x:>7.3f}' for x in r[kind]))
  return '\n'.join(lines)
