"""The default optimizer against the real `t5x.adafactor.Adafactor` on a model-shaped tree.

Prints, over several steps with fresh random gradients, how far the project's
Adafactor (optim.make_optimizer defaults) is from T5X's (t5_1_1/*.gin settings:
decay_rate 0.8, step_offset 0, parameter scale, clipping 1.0, constant lr 1e-3,
factored by optim.LOGICAL_FACTOR_RULES), and how far the former setting
(multiply_by_parameter_scale=False) was. The tree is the real parameter tree of
`--size` / `--method` (network.random_params: init scales), with the attention
kernels reshaped to 3-D [embed, heads, kv] / [heads, kv, embed] (Flaxformer's
layout, factored by T5X's rules) unless --no_3d_attention. Adafactor without
global-norm clipping is per leaf, so each leaf runs on its own (memory: one
leaf at a time); by default only layer 0 of each stack (the other layers have
the same shapes), --all_layers for every leaf.

  python bench/adafactor_vs_t5x.py --size=base --method=global --steps=3

Needs t5x (imported here, lazily); the project itself does not.
"""
from __future__ import annotations

import argparse
import json
import re
import time

import jax
import numpy as np
import optax
from flax import traverse_util
from jax.sharding import PartitionSpec

from hyperprompt_t5x.checkpoints import pretrained
from hyperprompt_t5x.model import network
from hyperprompt_t5x import optim

LR = 1e-3
ATTENTION = re.compile(r'(attention|self_attention|encoder_decoder_attention)/(query|key|value|out)/kernel$')


def model_leaves(size: str, method: str, num_tasks: int, all_layers: bool, attention_3d: bool):
  """[(name, float32 param, logical axes)] of the model tree."""
  cfg = network.T5Config.from_size(size, method=method, num_tasks=num_tasks)
  params = traverse_util.flatten_dict(network.random_params(cfg), sep='/')
  axes = traverse_util.flatten_dict(network.param_logical_axes(cfg), sep='/')
  out = []
  for name, p in params.items():
    if not all_layers and re.search(r'/layers_([1-9]\d*)/', name):
      continue
    p, ax = np.asarray(p, np.float32), tuple(axes[name])
    match = ATTENTION.search(name)
    if attention_3d and match:
      heads, kv = cfg.num_heads, cfg.head_dim
      if match.group(2) == 'out':   # [heads*kv, embed] -> [heads, kv, embed]
        p, ax = p.reshape(heads, kv, p.shape[-1]), ('heads', 'kv', 'embed')
      else:                         # [embed, heads*kv] -> [embed, heads, kv]
        p, ax = p.reshape(p.shape[0], heads, kv), ('embed', 'heads', 'kv')
    out.append((name, p, ax))
  return out


def _grads(shape, steps: int, seed: int):
  rng = np.random.default_rng(seed)
  return [np.asarray(10.0 ** rng.uniform(-4, 0) * rng.standard_normal(shape), np.float32)
          for _ in range(steps)]


def run_t5x(adafactor, tree, axes_tree, grads):
  """[(params, T5X OptimizerState)] after each step of T5X's Adafactor."""
  opt = adafactor.Adafactor(learning_rate=LR, logical_factor_rules=optim.LOGICAL_FACTOR_RULES)
  opt.set_param_axes(axes_tree)
  state = opt.init_state(tree)
  apply = jax.jit(lambda p, s, g: opt.apply_gradient(opt.hyper_params, p, s, g))
  out = []
  for g in grads:
    tree, state = apply(tree, state, g)
    out.append((tree, state))
  return out


def optax_step(tree, axes_tree, **kw):
  tx = optim.make_optimizer('adafactor', LR, params=tree, param_axes=axes_tree, **kw)

  @jax.jit
  def apply(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s
  return tx, apply


def run_optax(tree, axes_tree, grads, **kw):
  """Parameters after each step of the project's Adafactor, from `tree`."""
  tx, apply = optax_step(tree, axes_tree, **kw)
  state = tx.init(tree)
  out = []
  for g in grads:
    tree, state = apply(tree, state, g)
    out.append(tree)
  return out


def each_step_from_t5x(tree, axes_tree, grads, theirs):
  """Parameters after step k of the project's Adafactor started from T5X's
  parameters and state after step k - 1 (restored as a checkpoint would be)."""
  tx, apply = optax_step(tree, axes_tree)
  out = []
  for step, g in enumerate(grads):
    state = tx.init(tree)
    if step:
      tree, t5x_state = theirs[step - 1]
      saved = pretrained.adafactor_state_from_t5x(t5x_state)
      state, _, _ = optim.restore_adafactor_state(state, saved.step, saved.param_states,
                                                  skip_prefix=None)
    out.append(apply(tree, state, g)[0])
  return out


def _rms(x) -> float:
  return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--size', default='base', choices=network.SIZES)
  ap.add_argument('--method', default='global', choices=network.METHODS)
  ap.add_argument('--num_tasks', type=int, default=8)
  ap.add_argument('--steps', type=int, default=3)
  ap.add_argument('--all_layers', action='store_true')
  ap.add_argument('--no_3d_attention', action='store_true')
  ap.add_argument('--out', help='write the figures as JSON here')
  args = ap.parse_args(argv)
  try:
    from t5x import adafactor  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise SystemExit(f't5x is not importable ({e}); install it with '
                     '../shared/vendor/install-t5x.sh PYTHON') from e
  t0 = time.perf_counter()
  rows = []
  leaves = model_leaves(args.size, args.method, args.num_tasks, args.all_layers,
                        not args.no_3d_attention)
  for i, (name, p, ax) in enumerate(leaves):
    tree = {'leaf': p}
    axes_tree = {'leaf': PartitionSpec(*ax)}
    grads = [{'leaf': g} for g in _grads(p.shape, args.steps, i)]
    theirs = run_t5x(adafactor, tree, axes_tree, grads)
    ours = each_step_from_t5x(tree, axes_tree, grads, theirs)
    ours_alone = run_optax(tree, axes_tree, grads)[-1]['leaf']
    old = run_optax(tree, axes_tree, grads[:1], multiply_by_parameter_scale=False)[0]['leaf']
    before = p
    for step in range(args.steps):
      t, o = np.asarray(theirs[step][0]['leaf']), np.asarray(ours[step]['leaf'])
      u_t5x = t - before
      diff = np.abs(o - t)
      spacing = np.spacing(np.maximum(np.maximum(np.abs(o), np.abs(t)), np.abs(before)))
      row = dict(name=name, shape=list(p.shape), axes=list(ax), step=step + 1,
                 max_abs_diff=float(diff.max()), max_ulps=float((diff / spacing).max()),
                 rel_diff=float(diff.max() / max(np.abs(u_t5x).max(), 1e-30)))
      if step == 0:
        row['old_over_t5x_rms'] = _rms(np.asarray(old) - p) / max(_rms(u_t5x), 1e-30)
      if step == args.steps - 1:  # N steps on its own vs T5X's N steps
        t_total = np.abs(t - p).max()
        row['trajectory_rel_diff'] = float(np.abs(np.asarray(ours_alone) - t).max() / t_total)
      rows.append(row)
      before = t
  kernels = [r['old_over_t5x_rms'] for r in rows
             if 'old_over_t5x_rms' in r and r['name'].endswith('kernel')
             and not r['name'].startswith('task_conditioning')]
  summary = dict(
      size=args.size, method=args.method, steps=args.steps, leaves=len(leaves),
      attention_3d=not args.no_3d_attention,
      max_abs_diff=max(r['max_abs_diff'] for r in rows),
      max_ulps=max(r['max_ulps'] for r in rows),
      max_rel_diff_of_update=max(r['rel_diff'] for r in rows),
      max_trajectory_rel_diff=max(r['trajectory_rel_diff'] for r in rows
                                  if 'trajectory_rel_diff' in r),
      old_setting_update_rms_over_t5x_backbone_kernels_step1=dict(
          median=float(np.median(kernels)), min=float(np.min(kernels)),
          max=float(np.max(kernels))),
      seconds=time.perf_counter() - t0)
  worst = max(rows, key=lambda r: r['rel_diff'])
  print(f'{args.size}/{args.method}: {len(leaves)} leaves x {args.steps} steps, '
        f'attention kernels {"3-D" if summary["attention_3d"] else "2-D"}')
  print(f'one step from the same params and state, ours vs T5X: max |param diff| '
        f'{summary["max_abs_diff"]:.3g} = {summary["max_ulps"]:.0f} float32 spacings of the '
        f'parameter at most; max |diff| / max |T5X update| '
        f'{summary["max_rel_diff_of_update"]:.3g} ({worst["name"]} step {worst["step"]})')
  print(f'{args.steps} steps each on its own: max |param diff| / max |T5X total update| '
        f'{summary["max_trajectory_rel_diff"]:.3g}')
  k = summary['old_setting_update_rms_over_t5x_backbone_kernels_step1']
  print(f'without the parameter scale: update RMS / T5X update RMS on backbone '
        f'kernels at step 1: median {k["median"]:.1f}x (min {k["min"]:.1f}, max {k["max"]:.1f})')
  print(f'{summary["seconds"]:.0f} s')
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(dict(summary=summary, rows=rows), f, indent=1)
  return summary


if __name__ == '__main__':
  main()
